"""The build pipeline: recipe -> inputs -> ESP files -> layout -> temp image -> self-check
-> published outputs. The library API the CLI calls (`build`, `lock`, `vendor`).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from builder import __version__, spec
from builder.errors import ArmvmError, RecipeError
from builder.payload.components import packages_used
from builder.disk.layout import PlannedFile, plan_layout
from builder.preflight import preflight


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path = Path("output")
    overrides: Mapping[str, object] = field(default_factory=dict)
    checksum: bool = False
    offline: bool = False
    mirror: Optional[str] = None
    keyring: Optional[Path] = None
    vendor_dirs: Sequence[Path] = ()
    cache_dir: Optional[Path] = None
    update_lock: bool = False
    progress: Optional[bool] = None
    environ: Optional[Mapping[str, str]] = None
    lock: Optional[Path] = None            # --lock PATH (default: <name>.lock beside the recipe)
    on_warning: Optional[Callable[[str], None]] = None   # called at once for each recipe warning
    formats: Optional[Sequence[str]] = None   # --format (overrides output.formats): raw, qcow2, raw.zst, raw.xz


@dataclass
class BuildResult:
    ok: bool
    name: str
    image: Optional[Path]
    outputs: List[Path]
    stages: Dict[str, float]
    report: object = None              # builder.verify.report.Report
    message: str = ""
    packages: List[str] = field(default_factory=list)    # "name version" of every Debian package
    lock: Optional[Path] = None        # the lock file the build used (None: resolved afresh)
    warnings: List[str] = field(default_factory=list)    # recipe warnings (unused variables...)
    sha256: Dict[str, str] = field(default_factory=dict)  # published file name -> sha256

    def to_json(self) -> dict:
        return {"ok": self.ok, "name": self.name, "image": str(self.image) if self.image else None,
                "outputs": [str(p) for p in self.outputs], "sha256": dict(sorted(self.sha256.items())),
                "stages": {k: round(v, 4) for k, v in self.stages.items()},
                "verify": self.report.summary() if self.report is not None else None,
                "message": self.message}


def source_date_epoch(recipe, environ: Mapping[str, str], lock=None) -> int:
    value = environ.get("SOURCE_DATE_EPOCH")
    if value not in (None, ""):
        if not value.isdigit() or int(value) > 4354819199:
            raise ArmvmError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds since 1970 "
                             "(allowed: 0 to 4354819199)")
        return int(value)
    if lock is not None:
        return lock.source_date_epoch
    if recipe.source_date_epoch is not None:
        return recipe.source_date_epoch
    return spec.DEFAULT_SOURCE_DATE_EPOCH


def lock_path(recipe, options: Optional[BuildOptions] = None) -> Path:
    """--lock PATH, else <rendered name>.lock beside the recipe: each templated variant
    (another `name:`) gets its own lock."""
    if options is not None and options.lock is not None:
        return Path(options.lock)
    return recipe.path.with_name(recipe.name + ".lock")


def lock_command(recipe, options: BuildOptions) -> str:
    """The exact `armvm-build lock` command that refreshes this build's lock."""
    import shlex
    args = ["armvm-build", "lock", str(recipe.path)]
    for name, value in options.overrides.items():
        args += ["--set", f"{name}={value}"]
    if options.mirror:
        args += ["--mirror", options.mirror]
    args += ["--lock", str(lock_path(recipe, options))]
    return shlex.join(args)


def _with_lock_command(exc: ArmvmError, recipe, options: BuildOptions) -> ArmvmError:
    if "update the lock" in str(exc):
        return ArmvmError(f"{exc}; to update the lock run: {lock_command(recipe, options)} "
                          "(or build with --update-lock)", exit_code=exc.exit_code)
    return exc


def open_inputs(recipe, options: BuildOptions, *, use_lock: bool = True):
    """(fetcher, archive or None, lock or None) for a recipe."""
    from builder.inputs.cache import Cache
    from builder.inputs.sources import Fetcher
    cache = Cache(options.cache_dir)
    lock = None
    lp = lock_path(recipe, options)
    if use_lock and lp.exists() and not options.update_lock:
        from builder.inputs.lock import read_lock
        lock = read_lock(lp)
    fetcher = Fetcher(cache=cache, offline=options.offline, vendor_dirs=list(options.vendor_dirs),
                      progress=options.progress)
    archive = None
    if recipe.debian is not None:
        from builder.inputs.debian.archive import DebianArchive
        archive = DebianArchive(fetcher, mirror=options.mirror or recipe.debian.mirror, suite=recipe.debian.suite,
                                components=recipe.debian.components, arch=spec.ARCHES[recipe.arch].debian_arch,
                                keyring=options.keyring, lock=lock, offline=options.offline)
    elif packages_used(recipe):
        raise RecipeError(recipe.path, "the recipe uses Debian packages but has no `debian:` section",
                          field="debian", allowed="debian: {suite: trixie}")
    return fetcher, archive, lock, cache


def gather(ctx) -> List[PlannedFile]:
    """Fetch and build every ESP file; returns them with their roles."""
    from builder.payload import components as c
    from builder.inputs.cache import sha256_file
    recipe = ctx.recipe
    arch = spec.ARCHES[recipe.arch]
    c.check_supported(recipe)
    kernel = kinfo = initrd = None
    if recipe.rootfs is not None:
        from builder.disk.layout import root_fs_ids, root_partition_number
        ctx.root_uuid = str(root_fs_ids(ctx.seed, root_partition_number(recipe))[0])
    if recipe.kernel:
        kernel, kinfo = c.prepare_kernel(ctx)
        ctx.kinfo = kinfo
    if recipe.initramfs:
        initrd = c.prepare_initramfs(ctx, kinfo)
    loader, grub_cfg, kind = c.prepare_loader(ctx, kernel, initrd)
    files = [(f"{spec.REMOVABLE_DIR}/{arch.removable_name}", loader, "loader")] + list(ctx.extra_esp)
    if grub_cfg is not None:
        cfg = ctx.work / "grub.cfg"
        cfg.write_text(grub_cfg)
        files.append((spec.ESP_GRUB_CFG, cfg, "grub.cfg"))
    if kind != "uki":
        if kernel is not None:
            files.append((spec.ESP_KERNEL_PATH, kernel, "kernel"))
        if initrd is not None:
            files.append((spec.ESP_INITRD_PATH, initrd, "initrd"))
    esp = next(p for p in recipe.disk.partitions if p.type == "esp") if any(
        p.type == "esp" for p in recipe.disk.partitions) else None
    for n, entry in enumerate(esp.files if esp else ()):
        files.append((entry.dest, c.fetch_source(ctx, entry.source, f"esp.files[{n}]"), "file"))
    out = []
    for dest, path, role in files:
        digest = ctx.hashes.get(path) or sha256_file(path)[0]
        out.append(PlannedFile(dest, path, path.stat().st_size, digest, role))
    ctx.direct = (kernel, initrd, c.kernel_cmdline(ctx))
    return out


def build(recipe_path, options: BuildOptions = BuildOptions()) -> BuildResult:
    """Build one image; on a terminal (options.progress None or True) with live progress."""
    from builder.progress import BuildProgress
    info: dict = {}
    with BuildProgress(options.progress) as progress:
        result = _build(recipe_path, options, progress, info)
    ctx = info.get("ctx")
    if ctx is not None:
        result.packages = sorted({i["origin"][len("debian:"):].replace("=", " ", 1)
                                  for i in ctx.inputs if i["origin"].startswith("debian:") and "filename" in i})
    result.lock = info.get("lock")
    result.warnings = list(info["recipe"].warnings) if "recipe" in info else []
    result.warnings += list(ctx.warnings) if ctx is not None else []
    return result


def _build(recipe_path, options: BuildOptions, progress, info: dict) -> BuildResult:
    from builder.disk.assemble import write_image
    from builder.payload.components import Context
    from builder.publish.output import Staging, bmap_xml, canonical_json, sha256_sparse
    from builder.recipe.load import load_recipe

    environ = os.environ if options.environ is None else options.environ
    t_start = time.perf_counter()
    with progress.stage("recipe"):
        recipe = load_recipe(recipe_path, overrides=options.overrides, environ=environ)
        info["recipe"] = recipe
        for w in recipe.warnings:
            progress.warn(w, options.on_warning)
        preflight(recipe)
        try:
            fetcher, archive, lock, cache = open_inputs(recipe, options)
        except ArmvmError as exc:
            raise _with_lock_command(exc, recipe, options) from None
    info["lock"] = lock_path(recipe, options) if lock is not None else None
    timestamp = source_date_epoch(recipe, environ, lock)
    seed = recipe.seed or recipe.digest
    out_dir = Path(options.output_dir)
    with Staging(out_dir, recipe.name) as staging:
        work = staging.work_dir()
        try:
            ctx = Context(recipe, fetcher, work, timestamp, archive=archive, index_dir=cache.root / "kernel-index",
                          progress=progress)
            info["ctx"] = ctx
            ctx.seed = seed
            ctx.on_warning = options.on_warning
            ctx.want_root_pins = options.update_lock     # resolve the root's package set for the lock
            ctx.stages["recipe"] = time.perf_counter() - t_start
            try:
                files = gather(ctx)
            except ArmvmError as exc:
                raise _with_lock_command(exc, recipe, options) from None
            with ctx.stage("plan"):
                layout = plan_layout(recipe, files, timestamp=timestamp, seed=seed)
            if recipe.rootfs is not None:
                from builder.payload.rootfs import prepare_root
                layout = prepare_root(ctx, layout)
            image_tmp = staging.temp_path(f"{recipe.name}.raw")
            with ctx.stage("assembly"):
                extents = write_image(layout, image_tmp)
            with ctx.stage("self-check"):
                from builder.verify import verify_image
                # a UKI signed with the recipe's own key is judged against that key's cert (the
                # whole chain is that one binary); a signed `type: efi` loader may start
                # unsigned files, so its chain stays unjudged (sb.chain skip) unless verify gets --db
                sign = getattr(recipe.bootloader, "sign", None)
                own = sign is not None and recipe.bootloader.type == "uki"
                report = verify_image(image_tmp, arch=recipe.arch, db=[sign.cert] if own else ())
            report_json = canonical_json(report.to_json())
            ok = report.exit_code() == 0
            formats = tuple(dict.fromkeys(options.formats or recipe.output.formats))
            manifest = {
                "tool": {"name": "armvm-build", "version": __version__},
                "recipe": {"name": recipe.name, "digest": recipe.digest, "arch": recipe.arch,
                           "file": recipe.path.name},
                "source_date_epoch": timestamp, "seed": seed,
                "inputs": sorted(ctx.inputs, key=lambda i: (i["role"], i["origin"])),
                "layout": layout.to_json(),
            }
            if getattr(ctx, "initramfs_modules", None):
                manifest["initramfs"] = {"modules": ctx.initramfs_modules}
            if not ok:
                # published under its own names (temp + rename): the good image's report stays
                failed = out_dir / f"{recipe.name}.failed.raw"
                staging.retarget(image_tmp, failed.name)
                staging.write_text(f"{recipe.name}.failed.verify.json", report_json)
                from builder.publish.report_html import render
                staging.write_text(f"{recipe.name}.failed.report.html", render(manifest, report.to_json()))
                outputs = staging.commit()
                bad = ", ".join(ch.id for ch in report.checks if ch.level == "MUST" and ch.result == "fail")
                return BuildResult(False, recipe.name, failed, outputs, ctx.stages, report,
                                   f"the image fails MUST checks ({bad}); kept as {failed} with "
                                   f"{recipe.name}.failed.verify.json; the earlier {recipe.name}.raw "
                                   "and its reports are untouched")
            with ctx.stage("outputs"):
                from builder.publish import formats as fmt, report_html, sbom
                manifest["outputs"] = fmt.output_names(recipe.name, formats, recipe.output.sbom)
                checksum = options.checksum or recipe.output.checksum
                digests = {}
                if checksum:
                    digest = sha256_sparse(image_tmp)
                    manifest["image_sha256"] = digest
                    digests[f"{recipe.name}.raw"] = digest
                    staging.write_text(f"{recipe.name}.raw.sha256", f"{digest}  {recipe.name}.raw\n")
                staging.write_text(f"{recipe.name}.manifest.json", canonical_json(manifest))
                staging.write_text(f"{recipe.name}.verify.json", report_json)
                if recipe.output.bmap:
                    staging.write_text(f"{recipe.name}.bmap", bmap_xml(image_tmp, extents))
                if recipe.output.direct:
                    _stage_direct(staging, recipe.name, ctx.direct)
                sbom.stage_sbom(staging, recipe.name, manifest, recipe.output.sbom)
                staging.write_text(f"{recipe.name}.report.html", report_html.render(manifest, report.to_json()))
                digests.update(fmt.stage_formats(staging, recipe.name, image_tmp, formats, checksum))
                if "raw" not in formats:
                    staging.drop(image_tmp)          # only the other formats are published
                    digests.pop(f"{recipe.name}.raw", None)
                # the formats are written after the manifest: their digests go to --json and
                # the <name>.<format>.sha256 files; every other staged file is small, hash it too
                for tmp, final in staging.pending:
                    if tmp != image_tmp and final.name not in digests:
                        digests[final.name] = fmt.sha256_of(tmp)
            outputs = staging.commit()
            if options.update_lock and archive is not None:
                from builder.inputs.lock import write_lock
                write_lock(lock_path(recipe, options), _with_root(archive.make_lock(timestamp),
                                                                  getattr(ctx, "root_pins", None)))
                outputs.append(lock_path(recipe, options))
            image = out_dir / f"{recipe.name}.{'raw' if 'raw' in formats else formats[0]}"
            return BuildResult(True, recipe.name, image, outputs, ctx.stages, report, sha256=digests)
        except OSError as exc:
            from builder.publish.output import disk_full_error
            raise disk_full_error(exc, work) from None   # ENOSPC/EDQUOT/EFBIG: a clean error
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _with_root(lock_, pins):
    """The lock with the root's whole package set (`rootfs`) pinned, when the build made one."""
    if not pins:
        return lock_
    import dataclasses
    from builder.inputs.lock import LockedPackage
    return dataclasses.replace(lock_, rootfs={
        p.name: LockedPackage(p.name, p.version, p.filename, p.sha256, p.size, p.architecture, p.depends)
        for p in (pins[n] for n in sorted(pins))})


def _stage_direct(staging, name: str, direct) -> None:
    kernel, initrd, cmdline = direct
    for suffix, src in (("vmlinuz", kernel), ("initrd", initrd)):
        if src is not None:
            shutil.copyfile(src, staging.temp_path(f"{name}.{suffix}"))
    staging.write_text(f"{name}.cmdline", cmdline + "\n")


def lock(recipe_path, options: BuildOptions = BuildOptions(), on_warning=None) -> Path:
    """Resolve every Debian package the recipe uses and write the lock (--lock PATH, else
    <rendered name>.lock beside the recipe)."""
    from builder.inputs.lock import write_lock
    from builder.progress import BuildProgress
    from builder.recipe.load import load_recipe
    environ = os.environ if options.environ is None else options.environ
    with BuildProgress(options.progress) as progress:
        with progress.stage("recipe"):
            recipe = load_recipe(recipe_path, overrides=options.overrides, environ=environ)
            for w in recipe.warnings:
                progress.warn(w, on_warning)
            _, archive, _, _ = open_inputs(recipe, options, use_lock=False)
        if archive is None:
            raise RecipeError(recipe.path, "the recipe uses no Debian package: there is nothing to lock",
                              field="debian", allowed="a recipe with a debian: section")
        with progress.stage("resolve"):
            for name, is_kernel in packages_used(recipe):
                archive.resolve_kernel(name) if is_kernel else archive.resolve(name)
        timestamp = source_date_epoch(recipe, environ)
        pins = None
        if recipe.rootfs is not None and recipe.rootfs.kind == "debian":
            # the root's whole package set: what mmdebstrap installs (run now unless cached)
            from builder.payload.rootfs import discover_root
            _, _, pins = discover_root(recipe, archive, archive.cache, timestamp, bool(archive.fetcher.progress),
                                       progress.stage, need_pins=True)
    path = lock_path(recipe, options)
    write_lock(path, _with_root(archive.make_lock(timestamp), pins))
    return path


def vendor(recipe_path, dest: Path, options: BuildOptions = BuildOptions(), on_warning=None) -> List[Path]:
    """Export every .deb pinned by the recipe's lock into `dest` (for offline rebuilds)."""
    from builder.inputs.lock import export_vendor
    from builder.progress import BuildProgress
    from builder.recipe.load import load_recipe
    environ = os.environ if options.environ is None else options.environ
    recipe = load_recipe(recipe_path, overrides=options.overrides, environ=environ)
    for w in recipe.warnings:
        if on_warning:
            on_warning(w)
    path = lock_path(recipe, options)
    if not path.exists():
        raise ArmvmError(f"{path} does not exist: run `{lock_command(recipe, options)}` first")
    fetcher, _, lock_, cache = open_inputs(recipe, options)
    with BuildProgress(options.progress) as progress, progress.stage("export"):
        return export_vendor(lock_, cache, fetcher, dest)
