"""systemd-boot's view of the ESP: loader.conf, Boot Loader Specification Type #1 entries
(``/loader/entries/*.conf``) and Type #2 UKIs (``/EFI/Linux/*.efi``), and which entry it
boots by default (Boot Loader Specification; systemd-boot's boot.c ordering).

Order: entries without tries left last; entries with a sort-key before those without;
then sort-key ascending, machine-id ascending, version descending; finally the entry id
descending (newest first). The default is the first entry whose id matches loader.conf's
``default`` glob, else the first entry. An empty variable store has no LoaderEntryDefault
or saved entry, so ``@saved`` falls back to the first entry as well.
"""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Optional

LOADER_CONF = "/loader/loader.conf"
ENTRIES_DIR = "/loader/entries"
UKI_DIR = "/EFI/Linux"
MAX_CONF = 64 * 1024
MAX_ENTRIES = 1024
BOOT_COUNT_RE = re.compile(r"\+(\d+)(?:-(\d+))?(?=\.(?:conf|efi)$)", re.I)
ARCH_NAMES = {"aarch64": "aa64", "armv7": "arm"}


@dataclass
class BootEntry:
    id: str                      # file name, boot-counting suffix removed
    path: str                    # the .conf or .efi on the ESP
    type: int                    # 1 or 2
    title: str = ""
    version: str = ""
    machine_id: str = ""
    sort_key: str = ""
    linux: str = ""
    initrds: list = field(default_factory=list)
    options: list = field(default_factory=list)
    efi: str = ""
    architecture: str = ""
    tries_left: Optional[int] = None
    vol: object = None           # the file system the entry and its files are on
    where: str = "the ESP"

    @property
    def cmdline(self) -> str:
        return " ".join(self.options)


def parse_conf(text: str) -> list:
    """(key, value) pairs of a loader.conf or Type #1 entry: 'key value', '#' comments."""
    out = []
    for line in text.splitlines()[:10000]:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ") if " " in line else line.partition("\t")
        out.append((key.strip(), value.strip()))
    return out


def entry_from_conf(name: str, path: str, text: str) -> BootEntry:
    e = BootEntry(_id(name), path, 1, tries_left=_tries(name))
    for key, value in parse_conf(text):
        if key in ("title", "version", "sort-key", "linux", "efi", "architecture"):
            setattr(e, key.replace("-", "_"), value)
        elif key == "machine-id":
            e.machine_id = value
        elif key == "initrd":
            e.initrds += value.split()
        elif key == "options":
            e.options.append(value)
    return e


def entry_from_osrel(name: str, path: str, osrel: str) -> BootEntry:
    """A Type #2 UKI's entry: systemd-boot takes the sort key from IMAGE_ID or ID and the
    version from IMAGE_VERSION, VERSION, VERSION_ID or BUILD_ID of its .osrel."""
    kv = {}
    for line in osrel.splitlines()[:1000]:
        k, sep, v = line.partition("=")
        if sep:
            kv[k.strip()] = v.strip().strip("'\"")
    e = BootEntry(_id(name), path, 2, tries_left=_tries(name))
    e.title = kv.get("PRETTY_NAME") or kv.get("NAME") or e.id
    e.sort_key = kv.get("IMAGE_ID") or kv.get("ID") or ""
    e.version = next((kv[k] for k in ("IMAGE_VERSION", "VERSION", "VERSION_ID", "BUILD_ID")
                      if kv.get(k)), "")
    return e


def _id(name: str) -> str:
    return BOOT_COUNT_RE.sub("", name)


def _tries(name: str) -> Optional[int]:
    m = BOOT_COUNT_RE.search(name)
    return int(m.group(1)) if m else None


def verscmp(a: str, b: str) -> int:
    """A version comparison in the spirit of systemd's strverscmp_improved: runs of digits
    compare numerically, '~' sorts before anything, other characters by code point."""
    ta, tb = re.findall(r"\d+|~|[^\d~]", a or ""), re.findall(r"\d+|~|[^\d~]", b or "")
    for x, y in zip(ta, tb):
        if x == y:
            continue
        if x == "~" or y == "~":
            return -1 if x == "~" else 1
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1
        if x.isdigit() != y.isdigit():
            return 1 if x.isdigit() else -1
        return -1 if x < y else 1
    if len(ta) == len(tb):
        return 0
    longer = ta[len(tb)] if len(ta) > len(tb) else tb[len(ta)]
    sign = 1 if len(ta) > len(tb) else -1
    return -sign if longer == "~" else sign


def _compare(a: BootEntry, b: BootEntry) -> int:
    for x, y in (((a.tries_left == 0), (b.tries_left == 0)),
                 ((not a.sort_key), (not b.sort_key))):
        if x != y:
            return 1 if x else -1
    if a.sort_key and b.sort_key:
        for x, y in ((a.sort_key, b.sort_key), (a.machine_id, b.machine_id)):
            if x != y:
                return -1 if x < y else 1
        r = -verscmp(a.version, b.version)
        if r:
            return r
    return -verscmp(a.id, b.id)


def sort_entries(entries: list) -> list:
    return sorted(entries, key=functools.cmp_to_key(_compare))


def default_entry(entries: list, default: Optional[str]) -> tuple:
    """(entry or None, how it was chosen)."""
    ordered = sort_entries(entries)
    if not ordered:
        return None, "no boot entries"
    if default and not default.startswith("@"):
        for e in ordered:
            if fnmatch.fnmatchcase(e.id.lower(), default.lower()):
                return e, f"loader.conf 'default {default}'"
        return ordered[0], f"loader.conf 'default {default}' matches no entry; the first " \
                           "entry in systemd-boot's order"
    return ordered[0], "the first entry in systemd-boot's order" + (
        f" ('default {default}' needs a saved variable; the store is empty)" if default else "")
