"""Turn the recipe's kernel, initramfs and bootloader sections into files for the ESP.

Each function takes plain data (the recipe, a Context with the fetcher/archive/work dir)
and returns plain data (paths and roles); nothing here writes the disk image.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from builder import spec
from builder.errors import RecipeError
from builder.recipe.load import Recipe, Source


@dataclass
class Context:
    recipe: Recipe
    fetcher: object                    # builder.inputs.sources.Fetcher
    work: Path                         # scratch folder (removed after the build)
    timestamp: int
    archive: object = None             # builder.inputs.debian.archive.DebianArchive, when debian: is set
    inputs: List[dict] = field(default_factory=list)   # manifest "inputs"
    stages: Dict[str, float] = field(default_factory=dict)
    index_dir: Optional[Path] = None   # where kernel module indexes are cached
    hashes: Dict[Path, str] = field(default_factory=dict)   # sha256 of files already hashed
    direct: tuple = (None, None, "")   # (kernel, initrd, cmdline) for output.direct
    progress: object = None            # builder.progress.BuildProgress (live display), or None
    seed: str = ""                     # the seed every GUID/UUID is derived from
    kinfo: object = None               # builder.payload.kernel.KernelInfo of a packaged kernel
    root_uuid: Optional[str] = None    # file system UUID of the rootfs (known from the seed)
    extra_esp: List[tuple] = field(default_factory=list)   # (dest, path, role) beside the loader
    warnings: List[str] = field(default_factory=list)      # build-time warnings (signing ...)
    on_warning: object = None          # the CLI's warning printer (when no live display)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        if self.progress is not None:
            self.progress.enter(name)
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0
            if self.progress is not None:
                self.progress.leave(name)

    def record(self, role: str, origin: str, sha256: str, size: int, **extra) -> None:
        self.inputs.append({"role": role, "origin": origin, "sha256": sha256, "size": size, **extra})

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.progress is not None:
            self.progress.warn(text, self.on_warning)
        elif self.on_warning is not None:
            self.on_warning(text)

    def need_archive(self, what: str):
        if self.archive is None:
            raise RecipeError(self.recipe.path, f"{what} names a Debian package but the recipe has no "
                              "`debian:` section", field="debian", allowed="debian: {suite: trixie}")
        return self.archive


def origin_of(ctx: Context, src: Source) -> str:
    """A host-independent name for a source (local files relative to the recipe)."""
    if src.kind == "file":
        try:
            return "file:" + src.file.relative_to(ctx.recipe.path.resolve().parent).as_posix()
        except ValueError:
            return "file:" + src.file.name
    return src.describe()


def fetch_source(ctx: Context, src: Source, role: str) -> Path:
    """A local path holding the source's bytes (verified; cached for URLs and packages)."""
    if src.kind == "file":
        with ctx.stage("resolve"):
            art = ctx.fetcher.local(src.file)
    elif src.kind == "url":
        with ctx.stage("download"):
            art = ctx.fetcher.url(src.url, src.sha256)
    else:
        tree, pkg = package_tree(ctx, src.package, role)
        inner = (tree / src.path).resolve()
        if tree.resolve() not in inner.parents or not inner.is_file():
            raise RecipeError(ctx.recipe.path, f"package {pkg.name} {pkg.version} has no file {src.path!r}",
                              field=f"{role}.path", allowed="a regular file inside the package")
        from builder.inputs.cache import sha256_file
        digest, size = sha256_file(inner)
        ctx.hashes[inner] = digest
        ctx.record(role, f"debian:{pkg.name}={pkg.version}:{src.path}", digest, size)
        return inner
    ctx.hashes[art.path] = art.sha256
    ctx.record(role, origin_of(ctx, src), art.sha256, art.size)
    return art.path


def package_tree(ctx: Context, name: str, role: str, *, kernel: bool = False):
    archive = ctx.need_archive(role)
    with ctx.stage("resolve"):
        pkg = archive.resolve_kernel(name) if kernel else archive.resolve(name)
    with ctx.stage("download"):
        deb = archive.fetch(pkg)
    with ctx.stage("extract"):
        tree = archive.extract(deb)
    from builder.publish.sbom import copyright_license
    lic = copyright_license(tree, pkg.name)             # DEP-5 `Files: *` license, for the SBOM
    ctx.record(role, f"debian:{pkg.name}={pkg.version}", pkg.sha256, pkg.size, filename=pkg.filename,
               **({"license": lic} if lic else {}))
    return tree, pkg


def loader_package(recipe: Recipe) -> Optional[str]:
    """The Debian package the bootloader comes from (grub/uki), honouring an override."""
    b, arch = recipe.bootloader, spec.ARCHES[recipe.arch]
    if b is None or b.type == "efi":
        return None
    if b.source is not None and b.source.package:
        return b.source.package
    if b.type == "uki":
        return "systemd-boot-efi"
    from builder.payload.bootloader import grub_package
    return grub_package(arch, signed=b.signed)


def packages_used(recipe: Recipe) -> List[tuple]:
    """(package name, is_kernel) for every Debian package a build of `recipe` needs."""
    out = []
    if recipe.kernel and recipe.kernel.source.kind == "package":
        out.append((recipe.kernel.source.package, True))
    if recipe.initramfs:
        out.append((recipe.initramfs.busybox, False))
        out += [(e.source.package, False) for e in recipe.initramfs.files if e.source.kind == "package"]
    if loader_package(recipe):
        out.append((loader_package(recipe), False))
    if recipe.bootloader is not None and recipe.bootloader.shim:
        from builder.payload.bootloader import shim_packages
        out += [(p, False) for p in shim_packages(spec.ARCHES[recipe.arch])]
    b = recipe.bootloader
    if b and b.type == "efi" and b.source and b.source.kind == "package":
        out.append((b.source.package, False))
    out += [(e.source.package, False) for p in recipe.disk.partitions for e in p.files
            if e.source.kind == "package"]
    return list(dict.fromkeys(out))


def kernel_cmdline(ctx: Context) -> str:
    """The recipe's command line, plus root=UUID= of the rootfs (never a device name) unless
    the recipe names a root= itself."""
    cmdline = ctx.recipe.kernel.cmdline if ctx.recipe.kernel else ""
    if ctx.root_uuid and not any(w.startswith("root=") for w in cmdline.split()):
        fmt = next(p.format for p in ctx.recipe.disk.partitions if p.format)
        cmdline = f"{cmdline} root=UUID={ctx.root_uuid} rootfstype={fmt} rw".strip()
    return cmdline


def prepare_kernel(ctx: Context):
    """-> (kernel image path, KernelInfo or None)."""
    from builder.payload.kernel import inspect_kernel
    k = ctx.recipe.kernel
    arch = spec.ARCHES[ctx.recipe.arch]
    if k.source.kind == "package":
        tree, pkg = package_tree(ctx, k.source.package, "kernel", kernel=True)
        with ctx.stage("module scan"):
            info = inspect_kernel(tree, arch, index_cache=ctx.index_dir)
        return info.image, info
    return fetch_source(ctx, k.source, "kernel"), None


VIRTIO_TRANSPORTS = ("virtio_pci", "virtio_mmio")


def with_virtio_transports(kinfo, drivers) -> tuple:
    """A virtio device driver (virtio_blk, virtio_net, 9pnet_virtio...) finds no device
    without a transport: add virtio_pci and virtio_mmio in front when the kernel has them
    as modules and the recipe did not list them (built-in transports need nothing)."""
    names = [d.replace("-", "_") for d in drivers]
    if not any("virtio" in n and n not in VIRTIO_TRANSPORTS for n in names):
        return tuple(drivers)
    extra = [t for t in VIRTIO_TRANSPORTS if t not in names and t in kinfo.modules]
    return tuple(extra) + tuple(drivers)


def prepare_initramfs(ctx: Context, kinfo) -> Path:
    from builder.payload.initramfs import build_initramfs, find_busybox
    from builder.payload.kernel import resolve_drivers
    spec_i = ctx.recipe.initramfs
    if kinfo is None:
        raise RecipeError(ctx.recipe.path, "building an initramfs needs the kernel as a Debian package "
                          "(its modules and config)", field="kernel.package",
                          allowed="kernel: {package: linux-image-...}")
    tree, _ = package_tree(ctx, spec_i.busybox, "busybox")
    busybox = find_busybox(tree)
    drivers = list(spec_i.drivers)
    root_fstype = None
    if ctx.recipe.rootfs is not None:
        from builder.payload.rootfs import root_fstype_modules
        root_fstype = next(p.format for p in ctx.recipe.disk.partitions if p.format)
        drivers += [d for d in root_fstype_modules(kinfo, root_fstype) if d not in drivers]
    b = ctx.recipe.bootloader
    if b is not None and (b.shim or b.sign is not None) and "efivarfs" in kinfo.modules \
            and "efivarfs" not in drivers:
        drivers.append("efivarfs")     # /init reads the SecureBoot variable through it
    modules = resolve_drivers(kinfo, with_virtio_transports(kinfo, drivers))
    ctx.initramfs_modules = sorted(m.name for m in modules)     # for the manifest and SBOM
    extra = [(e.dest, fetch_source(ctx, e.source, "initramfs.files")) for e in spec_i.files]
    template = spec_i.init.read_text() if spec_i.init else None
    out = ctx.work / "initrd.img"
    with ctx.stage("initramfs"):
        build_initramfs(out=out, kernel=kinfo, modules=modules, busybox=busybox, init_template=template,
                        payload=spec_i.payload, extra_files=extra, compression=spec_i.compression,
                        mtime=ctx.timestamp, decompress_modules=spec_i.decompress_modules,
                        init_template_file=spec_i.init, root_fstype=root_fstype)
    return out


def prepare_loader(ctx: Context, kernel: Optional[Path], initrd: Optional[Path]):
    """-> (loader path, grub.cfg text or None, kind)."""
    b = ctx.recipe.bootloader
    arch = spec.ARCHES[ctx.recipe.arch]
    cmdline = kernel_cmdline(ctx)
    if b.type == "efi":
        if b.source is None:
            raise RecipeError(ctx.recipe.path, "type efi needs the loader's source", field="bootloader",
                              allowed="file, url (+sha256) or package (+path)")
        loader = fetch_source(ctx, b.source, "bootloader")
        if b.sign is not None:
            from builder.payload.sign import is_signed
            if is_signed(loader):
                ctx.warn(f"the loader {origin_of(ctx, b.source)} is already signed: bootloader.sign "
                         f"replaces its signature with one by {b.sign.cert.name}")
            loader = _sign(ctx, loader, arch)
        return loader, None, "efi"
    from builder.payload import bootloader as bl
    if b.type == "grub":
        template = b.config.read_text() if b.config else None
        cfg = bl.render_grub_cfg(cmdline=cmdline, template=template, template_file=b.config)
        tree, _ = package_tree(ctx, loader_package(ctx.recipe), "bootloader")
        if b.signed:
            grub = bl.find_signed_grub(tree, arch)
            if not b.shim:
                return grub, cfg, "grub-signed"
            return _shim_chain(ctx, arch, grub), cfg, "grub-shim"
        with ctx.stage("loader"):
            out = bl.build_grub(arch=arch, grub_tree=tree, out=ctx.work / arch.removable_name,
                                extra_modules=b.modules)
        return out, cfg, "grub"
    # uki
    from builder.payload.uki import build_uki, find_systemd_stub
    if kernel is None or initrd is None:
        raise RecipeError(ctx.recipe.path, "a UKI needs a kernel and an initramfs", field="bootloader.type",
                          allowed="kernel: and initramfs: sections")
    tree, _ = package_tree(ctx, loader_package(ctx.recipe), "bootloader")
    osrel = (f'NAME="armvm-build"\nID=armvm\nPRETTY_NAME="{ctx.recipe.name} (armvm-build)"\n'
             f'IMAGE_ID={ctx.recipe.name}\n')
    with ctx.stage("loader"):
        out = build_uki(stub=find_systemd_stub(tree, arch), kernel=kernel, initrd=initrd, cmdline=cmdline,
                        osrel=osrel, uname=_kernel_version(ctx), out=ctx.work / arch.removable_name)
    if b.sign is not None:
        out = _sign(ctx, out, arch)
    return out, None, "uki"


def _shim_chain(ctx: Context, arch, grub: Path) -> Path:
    """Debian's shim chain: shim is the removable-path loader; the signed GRUB (shim's
    second stage) and MokManager go beside it (ctx.extra_esp); never the fallback."""
    from builder.payload import bootloader as bl
    shim_pkg, helpers_pkg = bl.shim_packages(arch)
    tree, _ = package_tree(ctx, shim_pkg, "shim")
    shim = bl.find_in_tree(tree, bl.SHIM_NAMES[arch.name], shim_pkg)
    htree, _ = package_tree(ctx, helpers_pkg, "shim-helpers")
    mm = bl.find_in_tree(htree, bl.MOKMANAGER_NAMES[arch.name], helpers_pkg)
    ctx.extra_esp += [(f"{spec.REMOVABLE_DIR}/{bl.SHIM_SECOND_STAGE[arch.name]}", grub, "grub"),
                      (f"{spec.REMOVABLE_DIR}/{bl.SHIM_MOKMANAGER[arch.name]}", mm, "mokmanager")]
    return shim


def _sign(ctx: Context, loader: Path, arch) -> Path:
    """The loader signed with the recipe's db key (the key never leaves this process)."""
    from builder.payload.sign import load_signer, sign_file
    s = ctx.recipe.bootloader.sign
    signer = load_signer(s.key, s.cert, passphrase_env=s.passphrase_env)
    for w in signer.warnings:
        ctx.warn(w)
    out = ctx.work / f"{arch.removable_name}.signed"
    with ctx.stage("sign"):
        sign_file(loader, out, signer, what=loader.name)
    from builder.inputs.cache import sha256_file
    digest, size = sha256_file(s.cert)
    ctx.record("signing-cert", f"file:{s.cert.name}", digest, size, subject=signer.subject)
    return out


def _kernel_version(ctx: Context) -> str:
    for i in ctx.inputs:
        if i["role"] == "kernel" and i["origin"].startswith("debian:linux-image-"):
            return i["origin"].split("=", 1)[0][len("debian:linux-image-"):]
    return ""


def check_supported(recipe: Recipe) -> None:
    """Refuse combinations that cannot produce a bootable image, with the reason."""
    if recipe.bootloader is None:
        raise RecipeError(recipe.path, "the recipe has no bootloader", field="bootloader",
                          allowed="bootloader: {type: efi|grub|uki}")
    if recipe.initramfs is not None and recipe.kernel is None:
        raise RecipeError(recipe.path, "an initramfs needs a kernel", field="kernel",
                          allowed="kernel: {package: ...}")
    if recipe.bootloader.type in ("grub", "uki") and recipe.kernel is None:
        raise RecipeError(recipe.path, f"bootloader {recipe.bootloader.type} needs a kernel", field="kernel",
                          allowed="kernel: {package: ...} or {file: ...}")
    b = recipe.bootloader
    lines = getattr(recipe, "lines", None) or {}
    if b.shim:
        if recipe.arch != "aarch64":
            raise RecipeError(recipe.path, "Debian ships no shim for armhf (AArch32): Secure Boot with "
                              "Debian's signed shim chain is AArch64 only", line=lines.get(("bootloader", "shim")),
                              field="bootloader.shim",
                              allowed="false for armv7 (or a UKI signed with your own key: type: uki, sign: ...)")
        if b.type != "grub" or not b.signed:
            raise RecipeError(recipe.path, "shim starts Debian's signed GRUB: it needs type: grub and signed: true",
                              line=lines.get(("bootloader", "shim")), field="bootloader.shim",
                              allowed="bootloader: {type: grub, signed: true, shim: true}")
    if b.sign is not None and b.type not in ("uki", "efi"):
        raise RecipeError(recipe.path, f"sign: signs a UKI or a prebuilt loader, not type {b.type} "
                          "(Debian's signed GRUB is signed already: use shim: true)",
                          line=lines.get(("bootloader", "sign")), field="bootloader.sign",
                          allowed="type: uki or type: efi")
    if b.sign is not None:
        for what, path in (("key", b.sign.key), ("cert", b.sign.cert)):
            if not path.is_file():
                raise RecipeError(recipe.path, f"{path}: no such file", line=lines.get(("bootloader", "sign", what)),
                                  field=f"bootloader.sign.{what}",
                                  allowed="a file beside the recipe (armvm-build keys DIR writes db.key and db.crt)")
    if recipe.bootloader.signed and recipe.arch != "aarch64":
        raise RecipeError(recipe.path, "Debian ships a signed GRUB only for AArch64",
                          field="bootloader.signed", allowed="false for armv7")
    if recipe.output.direct and recipe.kernel is None:
        raise RecipeError(recipe.path, "direct boot output needs a kernel", field="output.direct")

