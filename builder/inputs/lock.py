"""Lock files: every Debian package a build used, pinned by version, file name and sha256.

JSON with sorted keys, written atomically. A lock that pins every input lets a build run
without InRelease or Packages (no network at all when the .debs are cached or vendored).
Debian's archive keeps only current versions, so a lock alone cannot refetch an old
package: keep the files too (``export_vendor``) or name a ``snapshot_mirror``.
``packages`` pins the image's own packages (kernel, busybox, loader...); ``rootfs`` pins
every package installed in a Debian root file system (what mmdebstrap installed), from
which a locked build makes the root again (builder.payload.rootfs).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from builder.inputs.cache import Cache, check_sha256
from builder.errors import ArmvmError

if TYPE_CHECKING:
    from builder.inputs.sources import Fetcher

LOCK_FORMAT = 1
MAX_LOCK_BYTES = 16 * 1024 * 1024
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*$")


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    filename: str                  # path in the archive, e.g. pool/main/b/busybox/...deb
    sha256: str
    size: int
    architecture: str = ""
    depends: str = ""              # kept so meta-package resolution works from the lock


@dataclass(frozen=True)
class Lock:
    source_date_epoch: int
    mirror: str | None
    snapshot_mirror: str | None
    suite: str
    packages: dict = field(default_factory=dict)     # name -> LockedPackage
    rootfs: dict = field(default_factory=dict)       # name -> LockedPackage: the root's whole package set
    path: str = field(default="", compare=False)     # where it was read from (for messages)


def check_archive_filename(filename: str, what: str) -> str:
    """A relative archive path without '..' (it is joined to mirror URLs and dirs)."""
    if not isinstance(filename, str) or not filename or filename.startswith("/") or \
            "\\" in filename or any(p in ("", ".", "..") for p in filename.split("/")) or \
            any(ord(c) < 0x21 for c in filename):
        raise ArmvmError(f"{what}: {filename!r} is not a relative archive path without '..'")
    return filename


def _package(path: str, name: str, data, section: str = "packages") -> LockedPackage:
    where = f"{path}: {section}.{name}"
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ArmvmError(f"{path}: {section}: {name!r} is not a Debian package name")
    if not isinstance(data, dict):
        raise ArmvmError(f"{where}: must be an object")
    for key in ("version", "filename", "sha256"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ArmvmError(f"{where}.{key}: missing or not a string")
    size = data.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ArmvmError(f"{where}.size: {size!r} is not a byte count (allowed: integer >= 0)")
    for key in ("architecture", "depends"):
        if not isinstance(data.get(key, ""), str):
            raise ArmvmError(f"{where}.{key}: must be a string")
    return LockedPackage(name=name, version=data["version"],
                         filename=check_archive_filename(data["filename"], f"{where}.filename"),
                         sha256=check_sha256(data["sha256"], f"{where}.sha256"), size=size,
                         architecture=data.get("architecture", ""),
                         depends=data.get("depends", ""))


def read_lock(path) -> Lock:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LOCK_BYTES + 1)
    except OSError as e:
        raise ArmvmError(f"{path}: cannot read lock file: {e.strerror}") from None
    if len(raw) > MAX_LOCK_BYTES:
        raise ArmvmError(f"{path}: lock file is larger than {MAX_LOCK_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArmvmError(f"{path}: not a valid JSON lock file: {e}") from None
    if not isinstance(data, dict):
        raise ArmvmError(f"{path}: a lock file must be a JSON object")
    if data.get("format") != LOCK_FORMAT:
        raise ArmvmError(f"{path}: format: {data.get('format')!r} is not supported "
                         f"(allowed: {LOCK_FORMAT})")
    epoch = data.get("source_date_epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ArmvmError(f"{path}: source_date_epoch: {epoch!r} is not allowed "
                         "(allowed: integer seconds >= 0)")
    for key in ("mirror", "snapshot_mirror"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ArmvmError(f"{path}: {key}: must be a URL string or null")
    if not isinstance(data.get("suite"), str) or not data["suite"]:
        raise ArmvmError(f"{path}: suite: missing or not a string")
    packages = data.get("packages", {})
    if not isinstance(packages, dict):
        raise ArmvmError(f"{path}: packages: must be an object of name -> package")
    rootfs = data.get("rootfs", {})
    if not isinstance(rootfs, dict):
        raise ArmvmError(f"{path}: rootfs: must be an object of name -> package")
    return Lock(source_date_epoch=epoch, mirror=data.get("mirror"),
                snapshot_mirror=data.get("snapshot_mirror"), suite=data["suite"],
                packages={n: _package(str(path), n, p) for n, p in packages.items()},
                rootfs={n: _package(str(path), n, p, "rootfs") for n, p in rootfs.items()},
                path=str(path))


def _entry(p: LockedPackage) -> dict:
    return {"version": p.version, "filename": p.filename, "sha256": p.sha256, "size": p.size,
            "architecture": p.architecture, "depends": p.depends}


def lock_to_json(lock: Lock) -> str:
    data = {
        "format": LOCK_FORMAT,
        "source_date_epoch": lock.source_date_epoch,
        "mirror": lock.mirror,
        "snapshot_mirror": lock.snapshot_mirror,
        "suite": lock.suite,
        "packages": {name: _entry(p) for name, p in lock.packages.items()},
    }
    if lock.rootfs:
        data["rootfs"] = {name: _entry(p) for name, p in lock.rootfs.items()}
    return json.dumps(data, sort_keys=True, indent=2) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_lock(path, lock: Lock) -> None:
    try:
        _atomic_write(Path(path), lock_to_json(lock).encode("utf-8"))
    except OSError as e:
        raise ArmvmError(f"{path}: cannot write lock file: {e.strerror}") from None


def export_vendor(lock: Lock, cache: Cache, fetcher: "Fetcher", dest_dir) -> list[Path]:
    """Copy every pinned .deb (the image's packages and the root's) into ``dest_dir`` under
    its archive file name (basename).

    Files come from the cache (re-verified), else through ``fetcher`` (vendor dirs, then
    the lock's mirror and snapshot mirror). Returns the written paths, sorted.
    """
    from builder.inputs.debian.archive import locked_urls
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    written = set()
    pins = sorted({(p.sha256, p.filename): p for p in
                   list(lock.packages.values()) + list(lock.rootfs.values())}.values(),
                  key=lambda p: (p.name, p.filename))
    for pkg in pins:
        name = pkg.name
        target = dest / os.path.basename(pkg.filename)
        source = cache.blob(pkg.sha256, verify=True)
        if source is None:
            source = fetcher.blob(pkg.sha256, locked_urls(lock, pkg.filename),
                                  what=f"{pkg.filename} ({name} {pkg.version})",
                                  names=[target.name], size=pkg.size).path
        if source.resolve() != target.resolve():
            fd, tmp = tempfile.mkstemp(prefix="." + target.name + ".", dir=dest)
            try:
                with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        written.add(target)
    return sorted(written)
