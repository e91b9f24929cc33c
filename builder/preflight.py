"""Checks that need no download, run before any network access: every local file the recipe
names exists, the partitions fit the disk and the ESP can hold FAT32 at the sector size.
Errors carry the recipe line and, for sizes, the MiB needed (a 4096-byte-sector ESP that is
too small used to be reported after half a minute of fetching, with no line).
"""
from __future__ import annotations

from pathlib import Path

from builder.errors import RecipeError
from builder.recipe.validate import bare_message


def preflight(recipe) -> None:
    """Judge what needs no download, before any network access: every local file the
    recipe names exists, the partitions fit the disk and the ESP can hold FAT32 at the
    sector size. Errors carry the recipe line and the size needed in MiB."""
    from builder.disk.fat32 import min_fat32_bytes
    from builder.disk.layout import plan_layout
    for fname, p in _local_files(recipe):
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "does not exist"
            raise RecipeError(recipe.path, f"{_rel(recipe, p)} {what}", line=recipe.line_of(fname),
                              field=fname, allowed="a regular file inside the recipe's folder")
    ss = recipe.disk.sector_size
    for i, part in enumerate(recipe.disk.partitions):
        if part.type == "esp" and part.size is not None and part.size < min_fat32_bytes(ss):
            fname = f"disk.partitions[{i}].size"
            raise RecipeError(recipe.path, f"the ESP is {_mib(part.size)} MiB, too small for FAT32 at "
                              f"{ss}-byte sectors: it needs at least {_mib_up(min_fat32_bytes(ss))} MiB",
                              line=recipe.line_of(fname), field=fname,
                              allowed=f"an ESP of at least {_mib_up(min_fat32_bytes(ss))} MiB "
                                      f"(disk.sector_size {ss})")
    try:
        plan_layout(recipe, [], timestamp=0, seed="preflight")
    except RecipeError as exc:
        if exc.line is None and recipe.line_of(exc.field) is not None:
            raise RecipeError(recipe.path, bare_message(exc), line=recipe.line_of(exc.field),
                              field=exc.field, allowed=exc.allowed) from None
        raise


def _local_files(recipe):
    """(field, host path) of every file the recipe names beside itself."""
    r = recipe
    if r.kernel and r.kernel.source.kind == "file":
        yield "kernel.file", r.kernel.source.file
    if r.bootloader and r.bootloader.source and r.bootloader.source.kind == "file":
        yield "bootloader.file", r.bootloader.source.file
    if r.bootloader and r.bootloader.config:
        yield "bootloader.config", r.bootloader.config
    if r.initramfs:
        if r.initramfs.init:
            yield "initramfs.init", r.initramfs.init
        for n, e in enumerate(r.initramfs.files):
            if e.source.kind == "file":
                yield f"initramfs.files[{n}].file", e.source.file
    for i, part in enumerate(r.disk.partitions):
        for n, e in enumerate(part.files):
            if e.source.kind == "file":
                yield f"disk.partitions[{i}].files[{n}].file", e.source.file


def _rel(recipe, p: Path) -> str:
    try:
        return p.relative_to(recipe.path.resolve().parent).as_posix()
    except ValueError:
        return str(p)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g}"


def _mib_up(n: int) -> int:
    return -(-n // (1 << 20))
