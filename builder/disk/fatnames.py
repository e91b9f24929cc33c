"""FAT names: which long names FAT can store, 8.3 short names, VFAT long-name entries.

Rules follow Microsoft's FAT specification (fatgen103, "FAT Long Directory Entries",
"Basis-Name Generation Algorithm", "Numeric-Tail Generation Algorithm").

Decisions recorded here:
- Long names: 1..255 UTF-16 code units; no control characters (< 0x20), none of
  ``" * / : < > ? \\ |``; no leading space, no trailing space or period (Windows strips
  them, so such a name could not be opened); not ``.`` or ``..``. DOS device names
  (CON, PRN, AUX, NUL, COM1-9, LPT1-9, also with an extension) are rejected too: FAT
  can hold them, but Windows cannot open them, and an ESP should be readable anywhere.
- Case-insensitive comparison upper-cases each character on its own (one-to-one
  mappings only; e.g. "ß" stays "ß"), like the up-case table FAT drivers use.
- Short names use only ASCII: any character outside the short-name set (including
  every non-ASCII character) becomes "_" and counts as a lossy conversion, so the
  bytes never depend on an OEM code page.
"""
from __future__ import annotations

import re
import struct

from builder import spec
from builder.errors import ArmvmError

MAX_LONG_NAME_UNITS = 255
LFN_UNITS_PER_ENTRY = 13
LFN_LAST_LONG_ENTRY = 0x40
MAX_NUMERIC_TAIL = 999999
# Long directory entry (fatgen103): LDIR_Ord, LDIR_Name1, LDIR_Attr, LDIR_Type,
# LDIR_Chksum, LDIR_Name2, LDIR_FstClusLO, LDIR_Name3.
LDIR_FORMAT = "<B10sBBB12sH4s"
assert struct.calcsize(LDIR_FORMAT) == 32

FORBIDDEN_CHARS = '"*/:<>?\\|'
# Characters a short (8.3) name may hold besides A-Z and 0-9 (fatgen103 "DIR_Name").
SHORT_NAME_SPECIALS = "$%'-_@~`!(){}^#&"
_SHORT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + SHORT_NAME_SPECIALS)
_DEVICE_NAMES = re.compile(r"(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(\..*)?\Z", re.IGNORECASE)
ALLOWED_TEXT = ("1-255 UTF-16 code units, no control characters, none of "
                + " ".join(FORBIDDEN_CHARS) + ", no leading space, no trailing space or "
                "period, not '.' or '..', not a DOS device name (CON, PRN, AUX, NUL, "
                "COM1-9, LPT1-9)")


def check_name(component: str) -> None:
    """Raise ArmvmError unless a VFAT long name can store this path component."""
    problem = _name_problem(component)
    if problem:
        raise ArmvmError(f"FAT cannot store the name {component!r}: {problem} "
                         f"(allowed: {ALLOWED_TEXT})")


def _name_problem(name: str) -> str | None:
    if not isinstance(name, str):
        return "it is not a string"
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it is a directory reference"
    for ch in name:
        if ord(ch) < 0x20:
            return f"control character {ord(ch):#04x}"
        if ch in FORBIDDEN_CHARS:
            return f"character {ch!r} is not allowed"
    try:
        units = len(name.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        return "it is not valid Unicode text (unpaired surrogate)"
    if units > MAX_LONG_NAME_UNITS:
        return f"it is {units} UTF-16 code units long"
    if name[0] == " ":
        return "it starts with a space"
    if name[-1] in " .":
        return "it ends with a space or a period"
    if _DEVICE_NAMES.match(name):
        return "it is a DOS device name"
    return None


def _upper(ch: str) -> str:
    up = ch.upper()
    return up if len(up) == 1 else ch


def fold(name: str) -> str:
    """Case-insensitive key: each character upper-cased when that maps one to one."""
    return "".join(_upper(ch) for ch in name)


def exact_short_name(name: str) -> bytes | None:
    """The 11-byte DIR_Name if ``name`` already is a valid upper-case 8.3 name."""
    base, dot, ext = name.partition(".")
    if not 1 <= len(base) <= 8 or len(ext) > 3 or (dot and not ext):
        return None
    if any(ch not in _SHORT_CHARS for ch in base + ext):
        return None
    return (base.ljust(8) + ext.ljust(3)).encode("ascii")


def basis_name(name: str) -> tuple[str, str, bool]:
    """fatgen103 basis name: (primary, extension, needs numeric tail)."""
    lossy = False
    chars = []
    for ch in fold(name):
        if ch in _SHORT_CHARS or ch in " .":
            chars.append(ch)
        else:
            chars.append("_")
            lossy = True
    text = "".join(chars).replace(" ", "").lstrip(".")
    primary = text.split(".", 1)[0][:8]
    last_dot = text.rfind(".")
    ext = text[last_dot + 1:last_dot + 4] if last_dot > 0 else ""
    if not primary:
        primary, lossy = "_", True
    fits = fold(name) == (primary + "." + ext if ext else primary)
    return primary, ext, lossy or not fits


def assign_short_names(names: list[str]) -> dict[str, bytes]:
    """Short names for the long names of one directory (no two equal under ``fold``).

    First, every name that is an 8.3 name apart from case keeps that name upper-cased
    (so no generated short name can equal another entry's long name). The others get
    their basis name with the first free numeric tail ~1, ~2, ..., handed out in sorted
    ``fold`` order: "longfilename1.txt" and "longfilename2.txt" become LONGFI~1.TXT and
    LONGFI~2.TXT.
    """
    result: dict[str, bytes] = {}
    pending = []
    for name in names:
        primary, ext, needs_tail = basis_name(name)
        if needs_tail:
            pending.append((fold(name), name, primary, ext))
        else:
            result[name] = (primary.ljust(8) + ext.ljust(3)).encode("ascii")
    taken = set(result.values())
    next_tail: dict[tuple[str, str], int] = {}   # keeps similar names linear, not quadratic
    for _, name, primary, ext in sorted(pending):
        short, next_tail[primary, ext] = _with_tail(primary, ext, taken, name,
                                                    next_tail.get((primary, ext), 1))
        result[name] = short
        taken.add(short)
    return result


def _with_tail(primary: str, ext: str, taken: set[bytes], name: str,
               first: int) -> tuple[bytes, int]:
    """The first free "~n" short name from ``first`` on, and the n to try next time."""
    for n in range(first, MAX_NUMERIC_TAIL + 1):
        tail = f"~{n}"
        candidate = (primary[:8 - len(tail)] + tail).ljust(8) + ext.ljust(3)
        raw = candidate.encode("ascii")
        if raw not in taken:
            return raw, n + 1
    raise ArmvmError(f"FAT: no free short name for {name!r} "
                     f"(more than {MAX_NUMERIC_TAIL} similar names in one directory)")


def needs_long_name(name: str) -> bool:
    return exact_short_name(name) is None


def lfn_checksum(short_name: bytes) -> int:
    """fatgen103 ChkSum() over the 11-byte DIR_Name."""
    total = 0
    for byte in short_name:
        total = (((total & 1) << 7) + (total >> 1) + byte) & 0xFF
    return total


def long_entry_count(name: str) -> int:
    units = len(name.encode("utf-16-le")) // 2
    return -(-units // LFN_UNITS_PER_ENTRY)


def long_entries(name: str, short_name: bytes) -> bytes:
    """The LFN entries for ``name``, in on-disk order (last part first)."""
    raw = name.encode("utf-16-le")
    count = long_entry_count(name)
    slot = LFN_UNITS_PER_ENTRY * 2
    if len(raw) % slot:
        raw += b"\x00\x00"
        raw += b"\xff" * (-len(raw) % slot)
    checksum = lfn_checksum(short_name)
    entries = []
    for index in range(count, 0, -1):
        part = raw[(index - 1) * slot:index * slot]
        order = index | (LFN_LAST_LONG_ENTRY if index == count else 0)
        entries.append(struct.pack(LDIR_FORMAT, order, part[0:10], spec.FAT_ATTR_LONG_NAME,
                                   0, checksum, part[10:22], 0, part[22:26]))
    return b"".join(entries)
