"""Recipes: load a recipe file into frozen dataclasses (the build's only view of it).

Text handling (rendering, YAML, schema validation) lives in recipe_validate.py; the schema
table itself in recipe_schema.py. Paths in a recipe are relative to the recipe file and
must stay inside its folder; ESP destinations must be storable on FAT.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional, Sequence, Tuple

from builder.errors import ArmvmError, RecipeError
from builder.recipe import validate as rv

ENV_VAR_PREFIX = "ARMVM_VAR_"


# --- data ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where one input comes from: exactly one of file, url (+sha256), package (+path)."""
    kind: str                         # "file" | "url" | "package"
    file: Optional[Path] = None       # absolute, inside the recipe folder
    url: Optional[str] = None
    sha256: Optional[str] = None
    package: Optional[str] = None
    path: Optional[str] = None        # file inside the package

    def describe(self) -> str:
        if self.kind == "file":
            return str(self.file)
        if self.kind == "url":
            return self.url or ""
        return f"debian:{self.package}" + (f":{self.path}" if self.path else "")


@dataclass(frozen=True)
class FileEntry:
    source: Source
    dest: str


@dataclass(frozen=True)
class PartitionSpec:
    type: str
    name: str
    size: Optional[int]
    label: str
    files: Tuple[FileEntry, ...]
    format: Optional[str] = None      # root: the file system written from rootfs: ("ext4")


@dataclass(frozen=True)
class RootFileEntry:
    file: Path
    dest: str                         # relative path inside the root
    mode: int


@dataclass(frozen=True)
class RootfsSpec:
    kind: str                         # "debian" | "tar" | "dir"
    variant: str = "minbase"          # debian
    packages: Tuple[str, ...] = ()    # debian
    path: Optional[Path] = None       # tar, dir
    hostname: str = "armvm"
    password_hash: Optional[str] = None
    network: str = "none"
    enable: Tuple[str, ...] = ()
    files: Tuple[RootFileEntry, ...] = ()


@dataclass(frozen=True)
class DiskSpec:
    size: int
    sector_size: int
    partitions: Tuple[PartitionSpec, ...]


@dataclass(frozen=True)
class DebianSpec:
    suite: str
    components: Tuple[str, ...]
    mirror: Optional[str]


@dataclass(frozen=True)
class KernelSpec:
    source: Source
    cmdline: str


@dataclass(frozen=True)
class InitramfsSpec:
    compression: str
    drivers: Tuple[str, ...]
    busybox: str
    init: Optional[Path]
    payload: Optional[str]
    files: Tuple[FileEntry, ...]
    decompress_modules: bool = False


@dataclass(frozen=True)
class BootloaderSpec:
    type: str                         # "efi" | "grub" | "uki"
    source: Optional[Source]          # efi: the prebuilt loader; grub/uki: package override
    signed: bool
    modules: Tuple[str, ...]
    config: Optional[Path]
    shim: bool = False
    sign: Optional["SignSpec"] = None


@dataclass(frozen=True)
class SignSpec:
    key: Path
    cert: Path
    passphrase_env: Optional[str] = None


@dataclass(frozen=True)
class OutputSpec:
    bmap: bool = True
    checksum: bool = False
    direct: bool = False
    formats: Tuple[str, ...] = ("raw",)
    sbom: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    arch: str
    source_date_epoch: Optional[int]
    seed: Optional[str]
    debian: Optional[DebianSpec]
    kernel: Optional[KernelSpec]
    initramfs: Optional[InitramfsSpec]
    bootloader: Optional[BootloaderSpec]
    disk: DiskSpec
    output: OutputSpec
    digest: str                       # sha256 of the canonical validated recipe
    data: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    rootfs: Optional[RootfsSpec] = None
    lines: Mapping[tuple, int] = field(repr=False, compare=False, default_factory=dict)
    warnings: Tuple[str, ...] = field(compare=False, default=())

    def line_of(self, dotted: Optional[str]) -> Optional[int]:
        """The recipe line of a field named like 'disk.partitions[0].size' (or its parent)."""
        if not dotted:
            return None
        path = tuple(int(p) if p.isdigit() else p
                     for p in re.findall(r"[^.\[\]]+", dotted))
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None




# --- loading ------------------------------------------------------------------------
MAX_VALUE_CHARS = 65536                  # one --set / ARMVM_VAR_ value


class UsageError(ArmvmError):
    """A malformed command-line argument (exit 2, like Click's own usage errors)."""

    exit_code = 2


def parse_set(items: Sequence[str]) -> dict:
    """--set name=value pairs; integers become ints, everything else stays a string.
    Names are case-sensitive (`--set Suite=x` does not set `suite`)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"--set {item!r} is not name=value (allowed: name=value with a name of "
                             "letters, digits and '_', not starting with a digit)")
        if len(value) > MAX_VALUE_CHARS:
            raise UsageError(f"--set {name}: the value is {len(value)} characters "
                             f"(allowed: at most {MAX_VALUE_CHARS})")
        out[name] = int(value) if re.fullmatch(r"-?\d{1,18}", value) else value
    return out


def env_vars(environ: Mapping[str, str]) -> dict:
    """Template variables from ARMVM_VAR_<name>; no other environment variable is visible.
    The name after the prefix is taken as is: ARMVM_VAR_FLAVOUR sets FLAVOUR, not flavour."""
    out = {}
    for k, v in environ.items():
        if k.startswith(ENV_VAR_PREFIX) and len(k) > len(ENV_VAR_PREFIX):
            if len(v) > MAX_VALUE_CHARS:
                raise UsageError(f"{k}: the value is {len(v)} characters (allowed: at most {MAX_VALUE_CHARS})")
            out[k[len(ENV_VAR_PREFIX):]] = v
    return out


def unused_variable_warnings(read: frozenset, env: Mapping[str, Any], overrides: Mapping[str, Any],
                             known: Sequence[str]) -> Tuple[str, ...]:
    """One warning per --set / ARMVM_VAR_ value the recipe never reads (typos build the
    wrong image with exit 0 otherwise); suggests the name meant, ignoring case."""
    import difflib
    candidates = sorted(set(read) | set(known))
    out = []
    for origin, names in (("--set", overrides), ("env", env)):
        for name in names:
            if name in read:
                continue
            what = f"--set {name}=..." if origin == "--set" else f"{ENV_VAR_PREFIX}{name}"
            text = f"{what}: the recipe never reads a variable named '{name}'; the value is unused"
            same_case = [c for c in candidates if c.lower() == name.lower()]
            close = same_case or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
            if close:
                text += f" (did you mean '{close[0]}'? names are case-sensitive)"
            elif candidates:
                text += f" (the recipe reads: {', '.join(candidates)})"
            out.append(text)
    return tuple(out)


def _looks_like_disk_image(path: Path, head: bytes) -> Optional[str]:
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        kind = "a disk image (MBR/GPT boot signature at byte 510)"
        if head[512:520] == b"EFI PART" or head[4096:4104] == b"EFI PART":
            kind = "a disk image (GPT)"
        return kind
    if head[:4] == b"QFI\xfb":
        return "a qcow2 disk image"
    if b"\0" in head[:4096]:
        return "a binary file"
    return None


def load_recipe(path, *, overrides: Optional[Mapping[str, Any]] = None,
                environ: Optional[Mapping[str, str]] = None) -> Recipe:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(path, "recipe file not found")
    except IsADirectoryError:
        raise RecipeError(path, "is a directory, not a recipe file")
    except OSError as exc:
        raise RecipeError(path, f"cannot read the recipe: {exc.strerror}")
    kind = _looks_like_disk_image(path, raw[:8192])
    if kind:
        from builder.errors import NotAnImageError
        raise NotAnImageError(f"{path} is {kind}, not a recipe (a YAML text file); "
                              f"to check an image run `armvm-build verify {path}`")
    if len(raw) > rv.MAX_RECIPE_BYTES:
        raise RecipeError(path, f"recipe is larger than {rv.MAX_RECIPE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(path, f"recipe is not UTF-8 (byte {exc.start})")
    declared = rv._extract_vars_block(text, path)
    env = env_vars(os.environ if environ is None else environ)
    variables = dict(declared)
    variables.update(env)
    variables.update(overrides or {})
    rendered, names_read, substitute = rv.render(text, variables, path)
    try:
        data, lines = rv.parse_yaml(rendered, path, substitute)
        if not isinstance(data, dict):
            raise RecipeError(path, "the recipe must be a YAML mapping", line=1, allowed="name, arch, disk, ...")
        rv.validate(data, lines, path)
        recipe = _to_recipe(path, data, lines)
    except RecipeError as exc:
        if exc.line and rendered.count("\n") != text.count("\n"):
            raise RecipeError(path, rv.bare_message(exc) + f" [line {exc.line} of the rendered recipe: "
                              "its template adds or removes lines]", line=exc.line, field=exc.field,
                              allowed=exc.allowed) from None
        raise
    warnings = unused_variable_warnings(names_read, env, overrides or {}, list(declared))
    return dataclasses.replace(recipe, warnings=warnings)


def _to_recipe(path: Path, data: dict, lines: dict) -> Recipe:
    base = path.resolve().parent
    canonical = {k: v for k, v in data.items() if k != "vars"}
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=True).encode()).hexdigest()

    def line(*p):
        return lines.get(p)

    def host_path(value: str, p) -> Path:
        rel = Path(value)
        if rel.is_absolute():
            raise RecipeError(path, f"{value!r} is an absolute path", line=line(*p), field=rv._dotted(p),
                              allowed="a path relative to the recipe, inside its folder")
        full = (base / rel).resolve()
        if full != base and base not in full.parents:
            raise RecipeError(path, f"{value!r} leaves the recipe's folder", line=line(*p), field=rv._dotted(p),
                              allowed="a path relative to the recipe, inside its folder")
        return full

    def source(d: dict, p) -> Optional[Source]:
        if "file" in d:
            return Source("file", file=host_path(d["file"], p + ("file",)))
        if "url" in d:
            return Source("url", url=d["url"], sha256=d["sha256"])
        if "package" in d:
            return Source("package", package=d["package"], path=d.get("path"))
        return None

    def files(items, p, fat=True) -> Tuple[FileEntry, ...]:
        out = []
        for i, item in enumerate(items):
            src = source(item, p + (i,))
            if src is None:
                raise RecipeError(path, "names no source", line=line(*p, i), field=rv._dotted(p + (i,)),
                                  allowed="one of file, url (+sha256), package (+path)")
            if src.kind == "package" and not src.path:
                raise RecipeError(path, "a package file needs `path` (the file inside the package)",
                                  line=line(*p, i), field=rv._dotted(p + (i, "path")))
            out.append(FileEntry(src, check_dest(item["dest"], path, line(*p, i, "dest"),
                                                 rv._dotted(p + (i, "dest")), fat=fat)))
        return tuple(out)

    d = data.get("debian")
    debian = DebianSpec(d["suite"], tuple(d.get("components", ["main"])), d.get("mirror")) if d else None
    k = data.get("kernel")
    kernel = None
    if k is not None:
        ks = source(k, ("kernel",))
        if ks is None:
            raise RecipeError(path, "names no kernel source", line=line("kernel"), field="kernel",
                              allowed="package, file or url (+sha256)")
        kernel = KernelSpec(ks, k.get("cmdline", ""))
    i = data.get("initramfs")
    initramfs = None
    if i is not None:
        initramfs = InitramfsSpec(
            i.get("compression", "gzip"), tuple(m.replace("-", "_") for m in i.get("drivers", [])),
            i.get("busybox", "busybox-static"),
            host_path(i["init"], ("initramfs", "init")) if "init" in i else None,
            i.get("payload"), files(i.get("files", []), ("initramfs", "files"), fat=False),
            i.get("decompress_modules", False))
    b = data.get("bootloader")
    bootloader = None
    if b is not None:
        bootloader = BootloaderSpec(b["type"], source(b, ("bootloader",)), b.get("signed", False),
                                    tuple(b.get("modules", [])),
                                    host_path(b["config"], ("bootloader", "config")) if "config" in b else None,
                                    b.get("shim", False),
                                    SignSpec(host_path(b["sign"]["key"], ("bootloader", "sign", "key")),
                                             host_path(b["sign"]["cert"], ("bootloader", "sign", "cert")),
                                             b["sign"].get("passphrase_env")) if "sign" in b else None)
    parts = []
    for n, pd in enumerate(data["disk"]["partitions"]):
        p = ("disk", "partitions", n)
        size = rv.parse_size(pd["size"], file=path, line=line(*p, "size")) if "size" in pd else None
        if pd["type"] != "esp" and ("files" in pd or "label" in pd):
            raise RecipeError(path, "files and label are only for the esp partition", line=line(*p),
                              field=rv._dotted(p), allowed="type: esp")
        if "format" in pd and pd["type"].lower() != "root":
            raise RecipeError(path, "format is only for the partition of type root", line=line(*p, "format"),
                              field=rv._dotted(p + ("format",)), allowed="type: root")
        parts.append(PartitionSpec(pd["type"].lower(), pd.get("name", pd["type"].upper()), size,
                                   pd.get("label", "ESP"), files(pd.get("files", []), p + ("files",)),
                                   pd.get("format")))
    disk = DiskSpec(rv.parse_size(data["disk"]["size"], file=path, line=line("disk", "size"), field_name="disk.size"),
                    data["disk"].get("sector_size", 512), tuple(parts))
    o = data.get("output", {})
    output = OutputSpec(o.get("bmap", True), o.get("checksum", False), o.get("direct", False),
                        _names(o.get("formats", ["raw"])), _names(o.get("sbom", [])))
    rootfs = _rootfs(path, data, lines, host_path, parts, debian, kernel, initramfs)
    return Recipe(path=path, name=data["name"], arch=data["arch"],
                  source_date_epoch=data.get("source_date_epoch"), seed=data.get("seed"),
                  debian=debian, kernel=kernel, initramfs=initramfs, bootloader=bootloader,
                  disk=disk, output=output, digest=digest, data=data, lines=lines, rootfs=rootfs)


def _names(value) -> Tuple[str, ...]:
    """One name or a list of names (output.formats, output.sbom), without repeats."""
    return tuple(dict.fromkeys([value] if isinstance(value, str) else value))


def _rootfs(path, data, lines, host_path, parts, debian, kernel, initramfs) -> Optional[RootfsSpec]:
    """The rootfs: section, checked against the partitions, kernel and initramfs it needs."""
    formatted = [i for i, p in enumerate(parts) if p.format]
    r = data.get("rootfs")
    if r is None:
        if formatted:
            i = formatted[0]
            raise RecipeError(path, "a partition with format: needs a rootfs: section to fill it",
                              line=lines.get(("disk", "partitions", i, "format")),
                              field=f"disk.partitions[{i}].format", allowed="rootfs: {debian: ...}, {tar: ...} or {dir: ...}")
        return None
    kinds = [k for k in ("debian", "tar", "dir") if k in r]
    if len(kinds) != 1:
        raise RecipeError(path, f"names {len(kinds)} root sources" + (f" ({', '.join(kinds)})" if kinds else ""),
                          line=lines.get(("rootfs",)), field="rootfs", allowed="exactly one of debian, tar, dir")
    roots = [i for i, p in enumerate(parts) if p.type == "root"]
    if len(roots) != 1 or parts[roots[0]].format is None:
        raise RecipeError(path, f"the rootfs needs exactly one partition of type root with a format "
                          f"(found {len(roots)} root partition(s))", line=lines.get(("disk", "partitions")),
                          field="disk.partitions", allowed="- {type: root, format: ext4}")
    if kinds[0] == "debian" and debian is None:
        raise RecipeError(path, "rootfs.debian builds from the recipe's Debian archive, but the recipe has no "
                          "`debian:` section", line=lines.get(("rootfs", "debian")), field="debian",
                          allowed="debian: {suite: trixie}")
    if kernel is None or kernel.source.kind != "package":
        raise RecipeError(path, "a rootfs needs the kernel as a Debian package (its modules go into the root)",
                          line=lines.get(("kernel",)), field="kernel.package", allowed="kernel: {package: linux-image-...}")
    if initramfs is None:
        raise RecipeError(path, "a rootfs needs an initramfs (its /init finds the root by UUID and hands over)",
                          line=lines.get(("rootfs",)), field="initramfs", allowed="initramfs: {}")
    d = r.get("debian", {})
    entries = []
    for n, e in enumerate(r.get("files", [])):
        p = ("rootfs", "files", n)
        dest = check_dest(e["dest"], path, lines.get(p + ("dest",)), rv._dotted(p + ("dest",)), fat=False)
        entries.append(RootFileEntry(host_path(e["file"], p + ("file",)), dest, int(e.get("mode", "0644"), 8)))
    source_path = None
    if kinds[0] in ("tar", "dir"):
        source_path = host_path(r[kinds[0]], ("rootfs", kinds[0]))
    return RootfsSpec(kinds[0], d.get("variant", "minbase"), tuple(d.get("packages", [])), source_path,
                      r.get("hostname", re.sub(r"[^a-z0-9-]", "-", data["name"].lower()).strip("-")[:63] or "armvm"),
                      r.get("password_hash"), r.get("network", "none"), tuple(r.get("enable", [])),
                      tuple(entries))


def check_dest(dest: str, file, line, fname, *, fat: bool = True) -> str:
    """A destination path: relative, no '..'; on the ESP (fat=True) every component must be
    storable on FAT, by the FAT writer's own rule (builder.disk.fatnames.check_name)."""
    allowed = "a relative path like EFI/BOOT/grub.cfg, without '..'"
    if dest.startswith("/") or dest.startswith("\\") or re.match(r"^[A-Za-z]:[\\/]", dest):
        raise RecipeError(file, f"{dest!r} is an absolute path", line=line, field=fname, allowed=allowed)
    parts = PurePosixPath(dest).parts
    if not parts:
        raise RecipeError(file, "is empty", line=line, field=fname, allowed=allowed)
    for part in parts:
        if part in (".", ".."):
            raise RecipeError(file, f"{dest!r} contains '{part}'", line=line, field=fname, allowed=allowed)
        if fat:
            from builder.disk.fatnames import ALLOWED_TEXT, FORBIDDEN_CHARS, check_name
            bad = sorted({c for c in part if c in FORBIDDEN_CHARS or ord(c) < 0x20})
            if bad:
                shown = " ".join(repr(c) for c in bad)
                raise RecipeError(file, f"FAT cannot store the name {part!r}: "
                                  f"{'the characters' if len(bad) > 1 else 'the character'} {shown} "
                                  f"{'are' if len(bad) > 1 else 'is'} not allowed in a FAT name",
                                  line=line, field=fname, allowed=ALLOWED_TEXT)
            try:
                check_name(part)
            except ArmvmError as exc:
                raise RecipeError(file, str(exc), line=line, field=fname) from None
        elif "\0" in part or len(part) > 255:
            raise RecipeError(file, f"{part!r} is not a valid file name", line=line, field=fname,
                              allowed="names up to 255 bytes without NUL")
    return "/".join(parts)
