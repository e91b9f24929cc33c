"""Which Debian mirror to use: --mirror, then $ARMVM_MIRROR, then the host's apt sources.

Host sources are read as files only (no apt involved), so this works on any host: deb822
``/etc/apt/sources.list.d/*.sources`` and one-line ``/etc/apt/sources.list`` plus
``sources.list.d/*.list``. The first enabled ``deb`` entry with an HTTP(S) URI whose suites
look like Debian's (codenames and aliases, optionally -updates/-backports) and that is not
a security archive wins; entries naming a plain suite are preferred over -updates and
similar.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Mapping

from builder.errors import ArmvmError

DEBIAN_SUITES = frozenset((
    "buzz rex bo hamm slink potato woody sarge etch lenny squeeze wheezy jessie stretch "
    "buster bullseye bookworm trixie forky duke sid experimental "
    "stable testing unstable oldstable oldoldstable").split())
_SUFFIX_RE = re.compile(r"^([a-z]+)(-(updates|backports|backports-sloppy|proposed-updates))?$")
MAX_SOURCES_FILE = 1024 * 1024


def normalize_mirror(url: str, what: str = "mirror") -> str:
    from urllib.parse import urlsplit
    url = url.strip() if isinstance(url, str) else ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ArmvmError(f"{what}: {url!r} is not an HTTP(S) URL of a Debian archive "
                         "(allowed: http://HOST/PATH or https://HOST/PATH, the directory "
                         "that holds dists/ and pool/)")
    return url.rstrip("/")


def _suite_rank(suite: str) -> int | None:
    """0 for a plain Debian suite, 1 for -updates/-backports, None if not Debian's."""
    m = _SUFFIX_RE.match(suite)
    if not m or m.group(1) not in DEBIAN_SUITES:
        return None
    return 1 if m.group(2) else 0


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_SOURCES_FILE).decode("utf-8", "replace")
    except OSError:
        return ""


def _deb822_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    from debian.deb822 import Deb822
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for para in Deb822.iter_paragraphs(lines, use_apt_pkg=False):
        if para.get("Enabled", "yes").strip().lower() == "no":
            continue
        yield (para.get("Types", "").split(), para.get("URIs", "").split(),
               para.get("Suites", "").split())


def _one_line_entries(text: str) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "[" in line:                          # options: deb [arch=... signed-by=...] URI ...
            head, _, rest = line.partition("[")
            _, _, rest = rest.partition("]")
            line = head + rest
        words = line.split()
        if len(words) >= 3:
            yield [words[0]], [words[1]], [words[2]]


def host_entries(root: Path) -> Iterator[tuple[str, str]]:
    """(uri, suite) pairs from the apt sources under ``root``, in apt's reading order."""
    apt = Path(root) / "etc" / "apt"
    files: list[tuple[Path, bool]] = [(apt / "sources.list", False)]
    parts = apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix in (".list", ".sources"):
                files.append((path, path.suffix == ".sources"))
    for path, is_deb822 in files:
        text = _read(path)
        entries = _deb822_entries(text) if is_deb822 else _one_line_entries(text)
        for types, uris, suites in entries:
            if "deb" not in types:
                continue
            for uri in uris:
                for suite in suites:
                    yield uri, suite


def find_mirror(explicit: str | None = None, *, root: Path = Path("/"),
                environ: Mapping[str, str] | None = None) -> str:
    """The Debian archive URL (without a trailing slash)."""
    if explicit:
        return normalize_mirror(explicit, "--mirror")
    env = os.environ if environ is None else environ
    if env.get("ARMVM_MIRROR"):
        return normalize_mirror(env["ARMVM_MIRROR"], "ARMVM_MIRROR")
    best: tuple[int, str] | None = None
    for uri, suite in host_entries(Path(root)):
        if not uri.startswith(("http://", "https://")):
            continue
        if "security" in suite or uri.rstrip("/").endswith("-security"):
            continue
        rank = _suite_rank(suite)
        if rank is None:
            continue
        if best is None or rank < best[0]:
            best = (rank, uri)
        if rank == 0:
            break
    if best is None:
        raise ArmvmError(
            "no Debian mirror found: pass --mirror URL or set ARMVM_MIRROR=URL (the URL of a "
            "Debian archive, the directory holding dists/ and pool/, e.g. "
            "http://MIRROR-HOST/debian); the host's apt sources "
            f"({Path(root) / 'etc/apt/sources.list'}, sources.list.d/*.list and *.sources) "
            "name no Debian archive")
    return normalize_mirror(best[1], "apt source")
