"""A Debian archive client in pure Python: InRelease (gpgv), Packages indexes, .debs.

Protocol: ``dists/<suite>/InRelease`` is verified with ``gpgv`` against a keyring and
parsed with python-debian; ``<component>/binary-<arch>/Packages.gz`` (else .xz, else plain)
is checked against its sha256 and size there, and parsed once into a small SQLite index
cached under the compressed file's hash; every .deb is checked against the sha256 of its
Packages entry. A lock that pins a package replaces all of that: no InRelease, no index.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from builder.inputs.cache import check_sha256, sha256_file
from builder.inputs.debian.deb import extract_deb
from builder.inputs.debian.index import INDEX_FORMAT, Index, IndexStream, build_index
from builder.inputs.debian.mirror import find_mirror
from builder.errors import ArmvmError, MissingToolError, SourceError
from builder.inputs.lock import Lock, LockedPackage, check_archive_filename
from builder.inputs.sources import Artifact, Fetcher

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MAX_INRELEASE = 32 * 1024 * 1024
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")
_WORD_RE = re.compile(r"^[a-z0-9][a-z0-9+._/-]*$")
_VERSIONED_KERNEL_RE = re.compile(r"^linux-image-[0-9]")
# Packages.gz before .xz: trixie's arm64 main index is 13.2 MB as .gz and 9.6 MB as .xz, but
# gzip decompresses its 56 MB about 7x faster (0.4 s against 3 s on a loaded 2-core host),
# which outweighs 3.6 MB more download on any link faster than ~1.5 MB/s. Both are checked
# against the same signed InRelease.
INDEX_COMPRESSIONS = (".gz", ".xz", "")


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    filename: str
    sha256: str
    size: int
    depends: str


def locked_urls(lock: Lock, filename: str, mirror: str | None = None) -> list[str]:
    """Where a pinned file can be downloaded: the mirror, then the lock's snapshot mirror."""
    bases = [mirror or lock.mirror, lock.snapshot_mirror]
    return [f"{b.rstrip('/')}/{filename}" for b in bases if b]


def check_keyring(keyring: Path) -> Path:
    keyring = Path(keyring).absolute()
    if not keyring.is_file():
        raise ArmvmError(f"keyring {keyring} not found: install the Debian package "
                         "'debian-archive-keyring' or pass --keyring FILE (a lock file that "
                         "pins every package needs no keyring)")
    return keyring


def verify_inrelease(data: bytes, keyring: Path) -> bytes:
    """The signed text of an InRelease file, verified by gpgv against ``keyring``."""
    keyring = check_keyring(keyring)
    with tempfile.TemporaryDirectory(prefix="armvm-gpgv-") as home:
        signed, out = os.path.join(home, "InRelease"), os.path.join(home, "out")
        with open(signed, "wb") as f:
            f.write(data)
        try:
            proc = subprocess.run(["gpgv", "--homedir", home, "--status-fd", "1", "--keyring",
                                   str(keyring), "--output", out, signed],
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        except FileNotFoundError:
            raise MissingToolError("gpgv", "gpgv", "to verify the archive's InRelease") from None
        status = proc.stdout.decode("utf-8", "replace").splitlines()
        tags = {line.split()[1] for line in status if line.startswith("[GNUPG:] ")
                and len(line.split()) > 1}
        if "BADSIG" in tags or "GOODSIG" not in tags or not os.path.isfile(out):
            detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise ArmvmError("InRelease signature check failed with keyring "
                             f"{keyring}: {' / '.join(detail[-3:]) or 'no good signature'}")
        with open(out, "rb") as f:
            return f.read()


def _parse_date(value, url: str, field: str) -> float | None:
    """An RFC 2822 date of a Release file as seconds since 1970 (None when absent)."""
    if value in (None, ""):
        return None
    from email.utils import parsedate_to_datetime
    try:
        return parsedate_to_datetime(str(value).strip()).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        raise ArmvmError(f"{url}: field {field}: {str(value)[:80]!r} is not a date (allowed: "
                         "RFC 2822, e.g. 'Sat, 21 Nov 2026 09:15:44 UTC')") from None


def _release_date(inrelease: bytes) -> float | None:
    m = re.search(rb"(?m)^Date:[ \t]*(.+?)[ \t]*$", inrelease[:MAX_INRELEASE])
    if not m:
        return None
    try:
        return _parse_date(m.group(1).decode("ascii", "replace"), "", "Date")
    except ArmvmError:
        return None


def _http_date(t: float) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def kernel_dependency(depends: str) -> str | None:
    """The linux-image-* a meta-package depends on (a versioned one preferred)."""
    names = [alt.strip().split(" ", 1)[0].split("(", 1)[0].split(":", 1)[0]
             for group in depends.split(",") for alt in group.split("|")]
    images = [n for n in names if n.startswith("linux-image-")]
    versioned = [n for n in images if _VERSIONED_KERNEL_RE.match(n)]
    return (versioned or images or [None])[0]


class DebianArchive:
    def __init__(self, fetcher: Fetcher, *, mirror: str | None, suite: str,
                 components: Sequence[str], arch: str, keyring: Path | None = None,
                 lock: Lock | None = None, offline: bool = False, now=None):
        for what, value in [("suite", suite), ("arch", arch)] + \
                [("component", c) for c in components]:
            if not isinstance(value, str) or not _WORD_RE.match(value) or ".." in value:
                raise ArmvmError(f"Debian {what}: {value!r} is not a valid name")
        if not components:
            raise ArmvmError("Debian components: at least one is needed (e.g. main)")
        if lock is not None and lock.suite != suite:
            raise ArmvmError(f"lock file {lock.path or ''}: pins suite {lock.suite!r}, but this "
                             f"build uses suite {suite!r}; update the lock")
        self.fetcher, self.cache = fetcher, fetcher.cache
        self.suite, self.components, self.arch = suite, list(components), arch
        self.keyring = Path(keyring) if keyring else DEFAULT_KEYRING
        self.lock = lock
        self.offline = offline or fetcher.offline
        self._mirror_arg, self._mirror = mirror, None
        self._release: dict | None = None
        self._now = now                      # seconds since 1970 for Valid-Until (tests)
        self._indexes: dict[tuple[str, str], Index | None] = {}
        self._pinned: dict[str, DebPackage] = {}
        self._fetched: dict[str, DebPackage] = {}

    # --- mirror and release ----------------------------------------------------------
    @property
    def mirror(self) -> str:
        if self._mirror is None:
            if self._mirror_arg is None and self.lock is not None and self.lock.mirror and \
                    not os.environ.get("ARMVM_MIRROR"):
                self._mirror = find_mirror(self.lock.mirror)
            else:
                self._mirror = find_mirror(self._mirror_arg)
        return self._mirror

    def _release_info(self) -> dict:
        if self._release is not None:
            return self._release
        url = f"{self.mirror}/dists/{self.suite}/InRelease"
        ref = "inrelease-" + hashlib.sha256(f"{self.mirror}\n{self.suite}".encode()).hexdigest()
        check_keyring(self.keyring)              # before any download
        if self.offline:
            sha = self.cache.get_ref(ref)
            path = self.cache.blob(sha, verify=True) if sha else None
            if path is None:
                raise SourceError(f"{url}: offline and no InRelease of '{self.suite}' is cached "
                                  "for this mirror; run once online, or build with a lock "
                                  "file and --vendor DIR")
            data = path.read_bytes()
        else:
            data = self.fetcher.get_bytes(url, what=f"InRelease of {self.suite}",
                                          limit=MAX_INRELEASE)
        text = verify_inrelease(data, self.keyring)
        release = self._parse_release(text, url)
        if not self.offline:
            # freshness only for metadata fetched now: lock and offline builds never look at
            # the clock, so their bytes cannot depend on it
            self._check_fresh(release, url, self.cache.get_ref(ref))
            _, sha = self.cache.put_stream([data], None, what=url)
            self.cache.set_ref(ref, sha)
        self._release = release
        return self._release

    def _check_fresh(self, release: dict, url: str, previous_sha: str | None) -> None:
        """Refuse a replayed archive state: an InRelease past its Valid-Until (Debian's
        -security and -updates suites carry one; trixie and bookworm themselves do not),
        or, for any suite, one older than the InRelease this cache verified before.
        ARMVM_IGNORE_VALID_UNTIL=1 allows both (for snapshot mirrors)."""
        if os.environ.get("ARMVM_IGNORE_VALID_UNTIL", "") not in ("", "0"):
            return
        import time
        now = self._now if self._now is not None else time.time()
        until = release.get("valid_until")
        if until is not None and now > until:
            raise SourceError(
                f"{url}: expired: Valid-Until {_http_date(until)} is past (now "
                f"{_http_date(now)}); the mirror may be replaying an old archive state with "
                "known vulnerabilities. Use an up-to-date mirror, or set "
                "ARMVM_IGNORE_VALID_UNTIL=1 when you mean a snapshot mirror")
        date = release.get("date")
        previous = self.cache.blob(previous_sha, verify=True) if previous_sha else None
        if date is None or previous is None:
            return
        try:
            seen = _release_date(previous.read_bytes())
        except OSError:
            return
        if seen is not None and date < seen:
            raise SourceError(
                f"{url}: signed on {_http_date(date)}, older than the InRelease of "
                f"{_http_date(seen)} this cache verified before; the mirror may be replaying "
                "an old archive state. Use an up-to-date mirror, or set "
                "ARMVM_IGNORE_VALID_UNTIL=1 when you mean a snapshot mirror")

    def _parse_release(self, text: bytes, url: str) -> dict:
        from debian.deb822 import Release
        release = Release(text.decode("utf-8", "replace"))
        names = {release.get("Suite", ""), release.get("Codename", "")}
        if self.suite not in names:
            raise ArmvmError(f"{url}: signed for suite {release.get('Suite')!r} / codename "
                             f"{release.get('Codename')!r}, not {self.suite!r}; refusing it")
        files = {}
        for entry in release.get("SHA256", []):
            try:
                files[entry["name"]] = (check_sha256(entry["sha256"]), int(entry["size"]))
            except (KeyError, ValueError, ArmvmError):
                continue
        arches = release.get("Architectures", "").split()
        if arches and self.arch not in arches:
            raise ArmvmError(f"suite {self.suite!r} has no architecture {self.arch!r} "
                             f"(available: {', '.join(arches)})")
        comps = release.get("Components", "").split()
        for c in self.components:
            if comps and c not in comps and c.split("/")[-1] not in comps:
                raise ArmvmError(f"suite {self.suite!r} has no component {c!r} "
                                 f"(available: {', '.join(comps)})")
        # Debian lists Architecture: all packages in every binary-<arch> index too
        all_inline = "Packages" in release.get("No-Support-for-Architecture-all", "").split()
        return {"files": files, "arches": arches,
                "date": _parse_date(release.get("Date"), url, "Date"),
                "valid_until": _parse_date(release.get("Valid-Until"), url, "Valid-Until"),
                "index_arches": [self.arch] if all_inline else [self.arch, "all"],
                "by_hash": release.get("Acquire-By-Hash", "").strip().lower() == "yes"}

    # --- indexes ---------------------------------------------------------------------
    def _index_entry(self, component: str, arch: str) -> tuple[str, str, int] | None:
        files = self._release_info()["files"]
        base = f"{component}/binary-{arch}/Packages"
        for suffix in INDEX_COMPRESSIONS:
            if base + suffix in files:
                return (suffix,) + files[base + suffix]  # type: ignore[return-value]
        return None

    def _index(self, component: str, arch: str, *, fetch: bool = True) -> Index | None:
        if (component, arch) in self._indexes:
            return self._indexes[(component, arch)]
        entry = self._index_entry(component, arch)
        if entry is None:
            self._indexes[(component, arch)] = None
            return None
        suffix, sha, size = entry
        key = f"{INDEX_FORMAT}-{sha}"
        tree = self.cache.tree(key, source=sha)
        if tree is None:
            if not fetch:
                return None
            tree = self.cache.put_tree(key, lambda d: self._build(d, component, arch, entry),
                                       source=sha)
        index = self._indexes[(component, arch)] = Index(tree / "packages.sqlite")
        return index

    def _build(self, dest: Path, component: str, arch: str, entry: tuple) -> None:
        """Download the Packages file (or take it from the cache) and scan it into ``dest``.
        A download is scanned while it arrives; the scan is written only after the
        compressed bytes matched the sha256 of the verified InRelease (``blob`` returns)."""
        suffix, sha, size = entry
        rel = f"{component}/binary-{arch}/Packages{suffix}"
        dists = f"{self.mirror}/dists/{self.suite}"
        urls = [f"{dists}/{rel}"]
        if self._release_info()["by_hash"]:
            urls.insert(0, f"{dists}/{component}/binary-{arch}/by-hash/SHA256/{sha}")
        plain = self._release_info()["files"].get(f"{component}/binary-{arch}/Packages")
        budget = plain[1] if plain else size * 1000 + 64 * 1024 * 1024
        what = f"{self.suite}/{rel}"
        streams: list[IndexStream] = []

        def tee(chunks):
            for old in streams:                # a retried transfer starts a fresh scan
                old.close()
            streams.clear()
            (dest / "packages.sqlite").unlink(missing_ok=True)
            streams.append(IndexStream(suffix, budget, what, dest))
            return streams[-1].tee(chunks)
        try:
            art = self.fetcher.blob(sha, urls, what=what, size=size, offline=self.offline,
                                    tee=tee)
            if streams:
                streams[-1].finish()
            else:
                build_index(art.path, suffix, dest, budget, what)
        finally:
            for stream in streams:
                stream.close()

    # --- resolution ------------------------------------------------------------------
    def _pin(self, pkg: DebPackage) -> DebPackage:
        self._pinned[pkg.name] = pkg
        return pkg

    def resolve(self, name: str, *, pin: bool = True) -> DebPackage:
        """The package `name` (from the lock, else the archive's index); with pin=False it
        is not added to the lock's `packages` (the root's set goes into `rootfs`)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ArmvmError(f"{name!r} is not a Debian package name (allowed: lower-case "
                             "letters, digits, '+', '-', '.')")
        if name in self._pinned:
            return self._pinned[name]
        keep = self._pin if pin else (lambda p: p)
        if self.lock is not None:
            return keep(self._from_lock(name))
        for arch in self._release_info()["index_arches"]:
            for component in self.components:
                index = self._index(component, arch)
                row = index.get(name) if index else None
                if row:
                    return keep(self._from_row(row, component))
        raise self._not_found(name)

    def _from_lock(self, name: str) -> DebPackage:
        assert self.lock is not None
        lp: LockedPackage | None = self.lock.packages.get(name)
        if lp is None:
            raise ArmvmError(f"package {name!r} is not pinned in the lock file "
                             f"{self.lock.path or '(lock)'}: update the lock (build without "
                             "it to resolve from the archive, then write it again)")
        if lp.architecture not in ("", "all", self.arch):
            raise ArmvmError(f"lock file {self.lock.path}: {name} is pinned for "
                             f"{lp.architecture}, but this build is for {self.arch}")
        return DebPackage(lp.name, lp.version, lp.architecture or self.arch, lp.filename,
                          lp.sha256, lp.size, lp.depends)

    def _from_row(self, row: tuple, component: str) -> DebPackage:
        name, version, arch, filename, sha, size, depends = row
        what = f"Packages of {self.suite}/{component}: {name}"
        if not isinstance(size, int) or size < 0:
            raise ArmvmError(f"{what}: bad Size {size!r}")
        return DebPackage(name, version, arch, check_archive_filename(filename, what),
                          check_sha256(sha, what), size, depends)

    def _not_found(self, name: str) -> ArmvmError:
        where = f"{self.suite} ({', '.join(self.components)})"
        indexes = [i for a in self._release_info()["index_arches"] for c in self.components
                   for i in [self._index(c, a)] if i is not None]
        providers = sorted({p for i in indexes for p in i.providers(name)})
        if providers:
            return ArmvmError(f"package {name!r} is a virtual package in {where} for "
                              f"{self.arch}; name one that provides it: {', '.join(providers)}")
        other = []                 # other architectures, from indexes already in the cache
        for arch in self._release_info()["arches"]:
            if arch in (self.arch, "all"):
                continue
            if any((i := self._index(c, arch, fetch=False)) is not None and i.get(name)
                   for c in self.components):
                other.append(arch)
        if other:
            return ArmvmError(f"package {name!r} is not built for {self.arch} in {where} "
                              f"(it exists for: {', '.join(other)})")
        import difflib
        names = sorted({n for i in indexes for n in i.names()})
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.7)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        return ArmvmError(f"package {name!r} not found in {where} for {self.arch}{hint}")

    def resolve_kernel(self, name: str) -> DebPackage:
        pkg = self.resolve(name)
        for _ in range(4):                           # meta -> (meta ->) versioned image
            if _VERSIONED_KERNEL_RE.match(pkg.name):
                return pkg
            dep = kernel_dependency(pkg.depends)
            if dep is None:
                break
            pkg = self.resolve(dep)
        raise ArmvmError(f"kernel package {name!r} is neither a versioned linux-image-* "
                         f"package nor a meta-package depending on one (Depends: "
                         f"{pkg.depends or 'none'})")

    # --- files -----------------------------------------------------------------------
    def fetch(self, pkg: DebPackage, *, verify: bool = False) -> Artifact:
        """The .deb file. A cached copy is not re-hashed here (``verify=False``): its bytes
        are used only through ``extract``, which re-hashes it before extracting and
        otherwise uses the stamped tree, so a warm build hashes no .deb."""
        self._fetched[pkg.sha256] = pkg
        def urls() -> list[str]:
            if self.lock is not None:
                return locked_urls(self.lock, pkg.filename, self.mirror)
            return [f"{self.mirror}/{pkg.filename}"]
        hint = ("export it where it is cached with `armvm-build vendor RECIPE DIR` and build with "
                "`--vendor DIR`")
        if self.lock is not None and self.lock.snapshot_mirror and self.offline:
            hint += f", or build online to use the lock's snapshot_mirror " \
                    f"{self.lock.snapshot_mirror}"
        elif self.lock is not None and not self.lock.snapshot_mirror:
            hint += ", or set snapshot_mirror in the lock file to a snapshot of the archive"
        return self.fetcher.blob(pkg.sha256, urls, what=f"{pkg.filename} ({pkg.name} "
                                 f"{pkg.version})", origin=f"debian:{pkg.name}={pkg.version}",
                                 names=[os.path.basename(pkg.filename)], size=pkg.size,
                                 hint=hint, offline=self.offline, verify=verify)

    def extract(self, pkg_or_artifact: Union[DebPackage, Artifact]) -> Path:
        """The package's extracted data tree, cached by the .deb's sha256 and checked
        against its stamp on every use. The .deb is re-hashed before it is extracted; a
        corrupt cached copy is fetched again (online) or named in the error (offline)."""
        sha = pkg_or_artifact.sha256
        key = f"deb-{sha}"
        tree = self.cache.tree(key, source=sha)
        if tree is not None:
            return tree
        pkg = pkg_or_artifact if isinstance(pkg_or_artifact, DebPackage) \
            else self._fetched.get(sha)
        if isinstance(pkg_or_artifact, Artifact) and \
                pkg_or_artifact.path != self.cache._blob_path(sha):
            art = pkg_or_artifact                      # a vendor file: hash it here
            try:
                got = sha256_file(art.path)[0]
            except OSError as e:
                raise SourceError(f"{art.path}: cannot read: {e.strerror}") from None
            if got != sha:
                raise SourceError(f"{art.path}: sha256 is {got}, expected {sha} (the file "
                                  "changed after it was checked); refusing to extract it")
        elif pkg is not None:
            art = self.fetch(pkg, verify=True)         # the cached copy re-hashed
        else:
            art = self.fetcher.blob(sha, [], what=str(pkg_or_artifact.path), verify=True)
        return self.cache.put_tree(key, lambda d: extract_deb(art.path, d), source=sha)

    def pinned(self) -> list[DebPackage]:
        return [self._pinned[n] for n in sorted(self._pinned)]

    def make_lock(self, source_date_epoch: int, snapshot_mirror: str | None = None) -> Lock:
        """A lock pinning everything resolved so far."""
        snapshot = snapshot_mirror or (self.lock.snapshot_mirror if self.lock else None)
        mirror = self._mirror or self._mirror_arg or (self.lock.mirror if self.lock else None)
        return Lock(source_date_epoch=source_date_epoch, mirror=mirror, snapshot_mirror=snapshot,
                    suite=self.suite, packages={
                        p.name: LockedPackage(p.name, p.version, p.filename, p.sha256, p.size,
                                              p.architecture, p.depends)
                        for p in self.pinned()})
