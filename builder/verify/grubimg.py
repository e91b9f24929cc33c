"""What a GRUB EFI image carries in its ``mods`` section: the prefix, an embedded config
and a memdisk (GRUB's include/grub/kernel.h, util/mkimage.c).

The section starts with ``struct grub_module_info64`` (magic 'mimg', padding, offset, size)
or ``grub_module_info32`` (magic, offset, size), followed by objects, each a
``struct grub_module_header`` (type, size including the header) and its data. Types:
OBJ_TYPE_ELF 0, OBJ_TYPE_MEMDISK 1, OBJ_TYPE_CONFIG 2, OBJ_TYPE_PREFIX 3. Every size is
bounded by the section before anything is read.
"""
from __future__ import annotations

import io
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Optional

from builder.verify.blob import Blob, SliceBlob
from builder.verify.pe import PeImage, section_blob

GRUB_MODULE_MAGIC = 0x676D696D          # 'mimg'
OBJ_TYPE_ELF, OBJ_TYPE_MEMDISK, OBJ_TYPE_CONFIG, OBJ_TYPE_PREFIX = 0, 1, 2, 3
MAX_OBJECTS = 4096
MAX_PREFIX = 4096
MAX_CONFIG = 1 << 20
MAX_MEMDISK = 64 << 20                  # a tar memdisk is read into memory up to this size
MAX_MEMDISK_FILE = 1 << 20


@dataclass
class GrubImage:
    prefix: Optional[str] = None        # as embedded, e.g. '/EFI/debian' or '(memdisk)/boot/grub'
    config: Optional[str] = None        # the embedded config (grub-mkimage -c)
    memdisk: Optional[Blob] = None
    modules: int = 0
    problems: list = field(default_factory=list)

    def memdisk_file(self, path: str) -> Optional[bytes]:
        """A file from a tar memdisk (grub-mkstandalone's), None when absent or unreadable."""
        if self.memdisk is None or self.memdisk.size > MAX_MEMDISK:
            return None
        try:
            with tarfile.open(fileobj=io.BytesIO(self.memdisk.read_at(0, self.memdisk.size)),
                              mode="r:") as tf:
                for m in tf:
                    if m.isfile() and "/" + m.name.lstrip("./") == path:
                        f = tf.extractfile(m)
                        return None if f is None else f.read(MAX_MEMDISK_FILE)
        except (tarfile.TarError, OSError, EOFError):
            return None
        return None


def split_prefix(prefix: str) -> tuple:
    """('memdisk', '/boot/grub') for '(memdisk)/boot/grub'; ('', '/EFI/BOOT') without a
    device (GRUB then uses the device it was loaded from)."""
    if prefix.startswith("("):
        dev, _, rest = prefix[1:].partition(")")
        return dev, rest or "/"
    return "", prefix


def read_mods(blob: Blob, pe: PeImage) -> Optional[GrubImage]:
    """The objects of the ``mods`` section; None when the image has no such section."""
    sec = pe.section("mods")
    if sec is None:
        return None
    data = section_blob(blob, sec)
    gi = GrubImage()
    head = data.read_at(0, 24)
    if len(head) < 12 or struct.unpack_from("<I", head, 0)[0] != GRUB_MODULE_MAGIC:
        gi.problems.append("the mods section does not start with GRUB's 'mimg' module info")
        return gi
    if len(head) >= 24 and struct.unpack_from("<I", head, 4)[0] == 0:
        offset, size = struct.unpack_from("<QQ", head, 8)           # grub_module_info64
    else:
        offset, size = struct.unpack_from("<II", head, 4)           # grub_module_info32
    end = min(size, data.size)
    pos, n = offset, 0
    while pos + 8 <= end and n < MAX_OBJECTS:
        otype, osize = struct.unpack_from("<II", data.read_at(pos, 8))
        if osize < 8 or pos + osize > end:
            gi.problems.append(f"module object at 0x{pos:X} has size {osize}, outside the "
                               "mods section")
            break
        body = pos + 8, osize - 8
        if otype == OBJ_TYPE_ELF:
            gi.modules += 1
        elif otype == OBJ_TYPE_PREFIX:
            raw = data.read_at(body[0], min(body[1], MAX_PREFIX))
            gi.prefix = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif otype == OBJ_TYPE_CONFIG:
            raw = data.read_at(body[0], min(body[1], MAX_CONFIG))
            gi.config = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif otype == OBJ_TYPE_MEMDISK:
            gi.memdisk = SliceBlob(data, body[0], body[1])
        pos += osize
        n += 1
    return gi
