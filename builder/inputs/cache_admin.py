"""Cache management for `armvm-build cache list | prune`: every entry with its size and last
use (the mtime of a blob or of a tree's stamp, touched on every use), and pruning by age
and total size that never removes an entry a running build holds (builds hold a shared
flock on every blob and stamp they take; prune needs an exclusive non-blocking one).
"""
from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from builder.inputs.cache import STAMP, TMP_STALE_SECONDS, TREES, _rmtree

_DERIVED_RE = re.compile(r"^(?:deb|debidx\d+)-([0-9a-f]{64})$")


@dataclass
class Entry:
    kind: str            # blob | tree | kernel-index | old-tree | tmp
    key: str
    path: Path
    size: int            # bytes (apparent sizes of the files)
    last_used: float     # seconds since 1970 (mtime of the blob or the tree's stamp)

    def to_json(self) -> dict:
        return {"kind": self.kind, "key": self.key, "path": str(self.path), "bytes": self.size,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used))}


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def list_entries(root: Path) -> list[Entry]:
    """Every entry of the cache at ``root``, least recently used first."""
    root = Path(root)
    out: list[Entry] = []

    def add(kind, key, path, size, used):
        out.append(Entry(kind, key, path, size, used))

    blobs = root / "sha256"
    if blobs.is_dir():
        for sub in sorted(blobs.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    st = f.lstat()
                    add("blob", f.name, f, st.st_size, st.st_mtime)
    trees = root / TREES
    if trees.is_dir():
        for d in sorted(trees.iterdir()):
            stamp = d / STAMP
            used = stamp.stat().st_mtime if stamp.is_file() else d.lstat().st_mtime
            add("tree", d.name, d, _tree_size(d), used)
    old = root / "trees"                 # armvm-build before stamped trees
    if old.is_dir():
        for d in sorted(old.iterdir()):
            add("old-tree", d.name, d, _tree_size(d), d.lstat().st_mtime)
    kindex = root / "kernel-index"
    if kindex.is_dir():
        for f in sorted(kindex.iterdir()):
            st = f.lstat()
            add("kernel-index", f.name, f, st.st_size, st.st_mtime)
    tmp = root / "tmp"
    if tmp.is_dir():
        for f in sorted(tmp.iterdir()):
            st = f.lstat()
            add("tmp", f.name, f, _tree_size(f) if f.is_dir() and not f.is_symlink()
                else st.st_size, st.st_mtime)
    out.sort(key=lambda e: (e.last_used, e.kind, e.key))
    return out


def _lock_target(entry: Entry) -> Optional[Path]:
    return {"blob": entry.path, "tree": entry.path / STAMP}.get(entry.kind)


def _remove_entry(root: Path, entry: Entry) -> bool:
    """Remove one entry unless a process holds it; True when removed."""
    target = _lock_target(entry)
    fd = None
    if target is not None and target.exists():
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:                  # held by a running build (or gone)
            if fd is not None:
                os.close(fd)
            return False
    try:
        if entry.path.is_dir() and not entry.path.is_symlink():
            away = Path(tempfile.mkdtemp(prefix="pruned-", dir=root / "tmp"))
            os.rename(entry.path, away / "x")   # gone at once for readers, then deleted
            _rmtree(away)
        else:
            entry.path.unlink()
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _groups(entries: list[Entry]) -> list[list[Entry]]:
    """Entries pruned together: a .deb or Packages blob with the tree made from it (a
    build takes both: a tree without its blob could neither be re-checked nor rebuilt
    offline), everything else alone; least recently used group first."""
    blobs = {e.key: e for e in entries if e.kind == "blob"}
    groups, taken = [], set()
    for e in entries:
        if e.kind == "tree":
            m = _DERIVED_RE.match(e.key)
            blob = blobs.get(m.group(1)) if m else None
            if blob is not None and id(blob) not in taken:
                groups.append([e, blob])
                taken.update((id(e), id(blob)))
    groups += [[e] for e in entries if id(e) not in taken]
    groups.sort(key=lambda g: max(e.last_used for e in g))
    return groups


def prune(root: Path, *, older_than_days: Optional[float] = None,
          max_size: Optional[int] = None, dry_run: bool = False,
          now: Optional[float] = None) -> dict:
    """Remove entries unused for more than ``older_than_days``, then the least recently
    used ones until the cache holds at most ``max_size`` bytes; a blob and the tree made
    from it go together (the later of their last uses counts). Entries a running build
    holds (shared flock) are skipped whatever their age, with their group; tmp/ leftovers
    go when older than a day. Returns what was removed, kept and freed."""
    root = Path(root)
    now = time.time() if now is None else now
    entries = list_entries(root)
    if entries:
        (root / "tmp").mkdir(parents=True, exist_ok=True)
    total = sum(e.size for e in entries)
    removed: list[Entry] = []
    busy: list[Entry] = []
    freed = 0
    done: set[int] = set()

    def drop(group: list[Entry]) -> None:
        nonlocal total, freed
        done.update(id(e) for e in group)
        for e in group:                  # the tree first: it is what a build holds longest
            if dry_run or _remove_entry(root, e):
                removed.append(e)
                total -= e.size
                freed += e.size
            else:
                busy.extend(group[group.index(e):])
                return

    groups = _groups(entries)
    for g in groups:
        used = max(e.last_used for e in g)
        if g[0].kind == "tmp":
            if now - used > TMP_STALE_SECONDS:
                drop(g)
        elif older_than_days is not None and now - used > older_than_days * 86400:
            drop(g)
    if max_size is not None:
        for g in groups:                             # least recently used first
            if total <= max_size:
                break
            if not any(id(e) in done for e in g) and g[0].kind != "tmp":
                drop(g)
    return {"root": str(root), "removed": [e.to_json() for e in removed],
            "busy": [e.to_json() for e in busy], "freed_bytes": freed,
            "remaining_bytes": total, "dry_run": dry_run}
