"""The root file system of a real OS image: one call from the build (`prepare_root`).

Source (mmdebstrap from the recipe's Debian archive, a tarball, or a folder) -> staging
folder -> hygiene (hygiene.py) -> ext4 (builder.disk.ext4), all in one fakeroot session
when unprivileged (stage.py). The result is a partition-sized sparse file that assembly
copies into the image, cached by content: a warm rebuild neither runs mmdebstrap nor mke2fs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from builder import __version__, spec
from builder.errors import ArmvmError, MissingToolError

FORMAT_VERSION = 4                     # bump when staging/hygiene changes the bytes


def root_fstype_modules(kinfo, fstype: str = "ext4") -> list:
    """Modules the initramfs must load to mount the root: the file system's module and its
    `softdep pre:` modules (ext4 needs crc32c, which is a softdep, not in depends=)."""
    from builder.payload.kernel import decompress_module, elf_section, norm, parse_modinfo
    name = norm(fstype)
    if name in kinfo.builtin or name not in kinfo.modules:
        return []
    mod = kinfo.modules[name]
    data = decompress_module((kinfo.modules_dir / mod.path).read_bytes(), mod.path)
    _, raw = elf_section(data, ".modinfo", f"module {mod.path}")
    pre = []
    for key, value in parse_modinfo(raw or b""):
        if key == "softdep":
            words = value.split()
            section = None
            for w in words:
                if w.endswith(":"):
                    section = w[:-1]
                elif section == "pre":
                    pre.append(w)
    return [m for m in (_by_alias(kinfo, p) for p in pre) if m] + [name]


def _by_alias(kinfo, wanted: str) -> Optional[str]:
    """A module name for a softdep (a module name or an alias such as crc32c); built-ins need
    nothing; among several modules with the alias the generic one is taken."""
    from builder.payload.kernel import norm
    name = norm(wanted)
    if name in kinfo.builtin:
        return None
    if name in kinfo.modules:
        return name
    having = sorted(m.name for m in kinfo.modules.values() if wanted in m.aliases)
    if not having:
        return None
    return next((m for m in having if m.endswith("_generic")), having[0])


@contextmanager
def _status(enabled: bool, text: str):
    if not enabled:
        yield lambda msg: None
        return
    from rich.console import Console
    with Console(stderr=True).status(text) as st:
        yield lambda msg: st.update(f"{text}: {msg}")


def prepare_root(ctx, layout):
    """Build (or take from the cache) the root partition's file system; returns the layout
    with that partition's `content` and manifest facts filled in."""
    from builder.inputs.cache import Cache
    from builder.disk.ext4 import tool_version
    from builder.disk.layout import root_fs_ids, root_partition_number
    recipe, r = ctx.recipe, ctx.recipe.rootfs
    number = root_partition_number(recipe)
    part = layout.partitions[number - 1]
    size = part.size(layout.sector_size)
    fs_uuid, hash_seed = root_fs_ids(layout.seed, number)
    cache: Cache = ctx.fetcher.cache
    progress = bool(getattr(ctx.fetcher, "progress", False))
    kinfo = ctx.kinfo

    info: dict = {}
    with ctx.stage("rootfs source"):
        if r.kind == "debian":
            tar, identity, info = _debian_root(ctx, cache, progress)
        elif r.kind == "tar":
            art = ctx.fetcher.local(r.path)
            from builder.payload.rootfs.tarball import check_tar
            summary = check_tar(art.path, can_mknod=_can_mknod())
            from builder.disk.ext4 import estimate_bytes
            need = estimate_bytes(summary.data_blocks, summary.members, size)
            if need > size:
                raise ArmvmError(f"rootfs tarball {r.path.name} ({summary.data_blocks * 4096 >> 20} MiB of files) "
                                 f"does not fit its {size >> 20} MiB partition: it needs about "
                                 f"{-(-need >> 20)} MiB; grow disk.size or the root partition")
            tar, identity = art.path, "tar:" + art.sha256
            ctx.record("rootfs", "file:" + r.path.name, art.sha256, art.size)
        else:
            if not r.path.is_dir():
                raise ArmvmError(f"rootfs dir {r.path} is not a folder")
            tar, identity = None, None        # a folder is read afresh every build
    files = []
    for e in r.files:
        art = ctx.fetcher.local(e.file)
        files.append((str(art.path), e.dest, e.mode, art.sha256))
        ctx.record("rootfs.files", "file:" + e.file.name, art.sha256, art.size)
    kernel_sha = next((i["sha256"] for i in ctx.inputs if i["role"] == "kernel"), "")
    hygiene = {"hostname": r.hostname, "password_hash": r.password_hash, "dhcp": r.network == "dhcp",
               "enable": list(r.enable), "files": [f[:3] for f in files]}
    key_data = {"source": identity, "files": [(f[1], f[2], f[3]) for f in files],
                **{k: v for k, v in hygiene.items() if k != "files"},
                "kernel": [kernel_sha, kinfo.version], "uuid": str(fs_uuid), "hash_seed": str(hash_seed),
                "size": size, "timestamp": ctx.timestamp, "mke2fs": tool_version(),
                "builder": __version__, "format": FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()

    def build(dest: Path) -> None:
        plan = {"source": {"kind": "tar" if tar else "dir", "path": str(tar or r.path)},
                "staging": str(ctx.work / "root-staging"), "work": str(ctx.work),
                "timestamp": ctx.timestamp, "hygiene": hygiene,
                "modules": {"dir": str(kinfo.modules_dir), "version": kinfo.version},
                "ext4": {"target": str(dest / "root.ext4"), "offset": 0, "size": size,
                         "uuid": str(fs_uuid), "hash_seed": str(hash_seed), "label": "root"},
                "result": str(ctx.work / "root-result.json")}
        result = _run_stage(plan, progress)
        (dest / "info.json").write_text(json.dumps(result, sort_keys=True))

    with ctx.stage("rootfs"), _status(progress, "building the root file system"):
        if identity is None:
            out = ctx.work / "root-fs"
            out.mkdir()
            build(out)
        else:
            out = cache.put_tree(f"rootfs-ext4-{key}", build)
    result = json.loads((out / "info.json").read_text())
    facts = {"source": identity or "dir:" + r.path.name, "kernel_version": kinfo.version,
             "hostname": r.hostname,
             "packages": [{"name": n, "version": v, "architecture": a} for n, v, a in result["packages"]],
             **({"mmdebstrap": info} if info else {})}
    new = dataclasses.replace(part, content=out / "root.ext4", root_info=tuple(sorted(facts.items())))
    parts = list(layout.partitions)
    parts[number - 1] = new
    return dataclasses.replace(layout, partitions=tuple(parts))


def _can_mknod() -> bool:
    return os.geteuid() == 0 or shutil.which("fakeroot") is not None


def _run_stage(plan: dict, progress: bool) -> dict:
    from builder.payload.rootfs import stage
    staging = Path(plan["staging"])
    try:
        if os.geteuid() == 0:
            try:
                return stage.run(plan)
            except OSError as exc:
                raise ArmvmError(f"staging the root failed: {exc.filename or ''}: {exc.strerror}") from None
        if shutil.which("fakeroot") is None:
            raise MissingToolError("fakeroot", "fakeroot", "to keep the root's owners and device nodes "
                                   "in an unprivileged build")
        plan_file = Path(plan["work"]) / "root-plan.json"
        plan_file.write_text(json.dumps(plan))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run(["fakeroot", "--", sys.executable, "-m", "builder.payload.rootfs.stage", str(plan_file)],
                              env=env, capture_output=True, text=True)
        res_file = Path(plan["result"])
        result = json.loads(res_file.read_text()) if res_file.is_file() else None
        if result is None:
            raise ArmvmError(f"the root staging session failed (exit {proc.returncode}): "
                             + " | ".join(proc.stderr.strip().splitlines()[-5:]))
        if "error" in result:
            raise ArmvmError(result["error"])
        return result
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    if not os.path.lexists(path):
        return

    def fix(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700) if os.path.isdir(p) and not os.path.islink(p) else None
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=fix)


def _debian_root(ctx, cache, progress: bool):
    """(tarball path, identity, facts) of the mmdebstrap root, built once per content key:
    from the lock's pinned .debs when the build has a lock, else from the archive (and then
    the root's package set is resolved for a lock to be written)."""
    archive = ctx.need_archive("rootfs.debian")
    if archive.lock is not None:
        return _pinned_root(ctx, archive, cache, progress)
    tree, key, pins = discover_root(ctx.recipe, archive, cache, ctx.timestamp, progress, ctx.stage,
                                    need_pins=bool(getattr(ctx, "want_root_pins", False)))
    ctx.root_pins = pins
    return tree / "root.tar", "debian:" + key, _facts(ctx.recipe, tree)


def _facts(recipe, tree: Path, **more) -> dict:
    r = recipe.rootfs
    return {"variant": r.variant, "suite": recipe.debian.suite, "arch": spec.ARCHES[recipe.arch].debian_arch,
            "include": list(r.packages), "version": (tree / "mmdebstrap.version").read_text().strip(), **more}


def _installed(tree: Path) -> list:
    from builder.payload.rootfs.repo import packages_in_tar
    listed = tree / "packages.json"
    if listed.is_file():
        return [tuple(p) for p in json.loads(listed.read_text())]
    return packages_in_tar(tree / "root.tar")


def discover_root(recipe, archive, cache, timestamp: int, progress: bool, stage, *, need_pins: bool):
    """The root built by mmdebstrap from the recipe's archive -> (cache tree, key, pins).

    pins: {name: DebPackage} of every package installed in the root, resolved through the
    archive's verified Packages index (None unless `need_pins`: only a lock needs them). When
    a lock is to be written and the cached root holds versions the archive no longer offers,
    the root is built again from the archive as it is now."""
    from builder.payload.rootfs import mmdebstrap as mm
    r = recipe.rootfs
    arch = spec.ARCHES[recipe.arch].debian_arch
    with stage("resolve"):
        named = []
        for name in r.packages:
            try:
                pkg = archive.resolve(name, pin=False)
            except ArmvmError as exc:
                raise ArmvmError(f"{recipe.path}: field 'rootfs.debian.packages': {exc}") from None
            named.append((pkg.name, pkg.version))
    key = mm.cache_key(suite=recipe.debian.suite, components=recipe.debian.components, arch=arch,
                       variant=r.variant, packages=named, timestamp=timestamp)
    if r.variant == "extract" and need_pins:
        raise ArmvmError(f"{recipe.path}: field 'rootfs.debian.variant': a lock pins the packages "
                         "the root installs, and variant 'extract' installs none (allowed with a lock: "
                         f"{', '.join(v for v in mm.VARIANTS if v != 'extract')})")

    def build(dest: Path) -> None:          # only on a cache miss: a warm build needs no tools
        if archive.offline:
            raise ArmvmError("the Debian root of this recipe is not in the cache, and --offline forbids "
                             "running mmdebstrap against the archive; build once online with the same "
                             "cache, or lock the recipe (`armvm-build lock`, `armvm-build vendor`) to "
                             "build the root offline from the pinned .debs")
        mm.check_tools(arch, r.variant)
        (dest / "mmdebstrap.version").write_text(mm.mmdebstrap_version() + "\n")
        with _status(progress, f"mmdebstrap {r.variant} {recipe.debian.suite} {arch}") as say:
            mm.run_mmdebstrap(out=dest / "root.tar", mirror=archive.mirror, suite=recipe.debian.suite,
                              components=recipe.debian.components, arch=arch, variant=r.variant,
                              packages=r.packages, timestamp=timestamp,
                              keyring=archive.keyring if archive.keyring.is_file() else None,
                              progress=say, log=dest / "mmdebstrap.log")
        from builder.payload.rootfs.repo import packages_in_tar
        (dest / "packages.json").write_text(json.dumps(packages_in_tar(dest / "root.tar")))

    for attempt in range(2):
        tree = cache.put_tree(f"rootfs-debian-{key}", build)
        if not need_pins:
            return tree, key, None
        with stage("resolve"):
            pins, stale = _resolve_installed(archive, _installed(tree), arch)
        if not stale or not need_pins:
            return tree, key, (None if stale else pins)
        # the cached root holds versions the archive no longer offers: build it afresh
        key = hashlib.sha256(json.dumps([key, stale]).encode()).hexdigest()
    raise ArmvmError(f"the archive changed while the root was built ({', '.join(stale[:5])}); "
                     "run the command again")


def _resolve_installed(archive, installed: list, arch: str):
    """({name: DebPackage}, ["name version -> archive's" ...]) for the root's packages."""
    pins, stale = {}, []
    for name, version, parch in installed:
        try:
            pkg = archive.resolve(name, pin=False)
        except ArmvmError:
            stale.append(f"{name} {version} -> none")
            continue
        if pkg.version != version or parch not in ("all", arch) or pkg.architecture not in ("all", arch):
            stale.append(f"{name} {version} -> {pkg.version}")
            continue
        pins[name] = pkg
    return pins, stale


HOOK_DIR = Path("/usr/share/mmdebstrap/hooks/file-mirror-automount")


def _fetch_pinned(archive, pkg):
    """The verified .deb of a pinned root package; a vendor file of that name whose sha256
    is not the pinned one is named as such (not just as missing)."""
    from builder.inputs.cache import sha256_file
    try:
        return archive.fetch(pkg, verify=True)
    except ArmvmError as exc:
        name = os.path.basename(pkg.filename)
        for d in archive.fetcher.vendor_dirs:
            f = Path(d) / name
            if f.is_file():
                got = sha256_file(f)[0]
                if got != pkg.sha256:
                    raise ArmvmError(f"{f}: sha256 is {got}, but the lock {archive.lock.path or ''} pins "
                                     f"{pkg.sha256} for the root package {pkg.name} {pkg.version}; "
                                     "the vendor file or the lock was altered (export the vendor "
                                     "folder again from a good lock)", exit_code=3) from None
        raise exc from None


def _pinned_root(ctx, archive, cache, progress: bool):
    """The root built by mmdebstrap from exactly the lock's `rootfs` packages: each .deb
    fetched (or taken from the cache / a vendor folder) and checked against its pinned sha256,
    put into a local flat repository with a Packages index written here, and mmdebstrap run
    against that folder alone, installing every pinned package by name."""
    from builder.inputs.debian.archive import DebPackage
    from builder.inputs.debian.mirror import normalize_mirror
    from builder.payload.rootfs import mmdebstrap as mm
    from builder.payload.rootfs.repo import packages_in_tar, write_repo
    recipe, r, lock = ctx.recipe, ctx.recipe.rootfs, archive.lock
    arch = spec.ARCHES[recipe.arch].debian_arch
    where = f"lock file {lock.path or '(lock)'}"
    if not lock.rootfs:
        raise ArmvmError(f"{where} pins no root packages (no `rootfs` section); update the lock: "
                         f"armvm-build lock {recipe.path} (or build with --update-lock)")
    if r.variant == "extract":
        raise ArmvmError(f"{recipe.path}: field 'rootfs.debian.variant': 'extract' installs nothing a "
                         "lock could pin; use essential, minbase or another installing variant")
    missing = [n for n in r.packages if n not in lock.rootfs]
    if missing:
        raise ArmvmError(f"{where}: the root packages {', '.join(missing)} of {recipe.path.name} are not "
                         f"pinned in its `rootfs` section; update the lock: armvm-build lock {recipe.path}")
    pins = []
    for name in sorted(lock.rootfs):
        lp = lock.rootfs[name]
        if lp.architecture not in ("", "all", arch):
            raise ArmvmError(f"{where}: rootfs.{name} is pinned for {lp.architecture}, but this root "
                             f"is for {arch}; update the lock")
        pins.append(DebPackage(lp.name, lp.version, lp.architecture or arch, lp.filename, lp.sha256,
                               lp.size, lp.depends))
    mirror = lock.mirror and normalize_mirror(lock.mirror, f"{where}: mirror")
    sources = f"deb {mirror} {recipe.debian.suite} {' '.join(recipe.debian.components)}" if mirror else \
        "# the lock this root was built from names no mirror"
    key = hashlib.sha256(json.dumps({
        "suite": recipe.debian.suite, "arch": arch, "variant": r.variant, "include": sorted(r.packages),
        "pins": sorted([p.name, p.version, p.architecture, p.sha256] for p in pins),
        "sources": sources, "timestamp": ctx.timestamp, "format": "pinned-1"}, sort_keys=True).encode()).hexdigest()

    def build(dest: Path) -> None:
        import shlex
        import tempfile
        mm.check_tools(arch, r.variant)
        if not HOOK_DIR.is_dir():
            raise MissingToolError(str(HOOK_DIR), "mmdebstrap", "to build a root from a local repository")
        with _status(progress, f"fetching {len(pins)} pinned root packages") as say:
            debs = []
            for n, p in enumerate(pins):
                say(f"{n + 1}/{len(pins)} {p.name}")
                art = _fetch_pinned(archive, p)
                debs.append((p.name, p.version, art.path, p.sha256, p.size))
        # Under /tmp: mmdebstrap's file-mirror hook bind-mounts the folder at the same path in
        # the chroot, and its clean-up empties the chroot's /tmp, so no trace of it is left.
        top = Path(tempfile.mkdtemp(prefix="armvm-root-repo-", dir="/tmp"))
        try:
            os.chmod(top, 0o755)
            repo = top / "repo"
            write_repo(repo, debs, recipe.debian.suite, arch)
            (dest / "mmdebstrap.version").write_text(mm.mmdebstrap_version() + "\n")
            hook = (f"rm -f \"$1\"/etc/apt/sources.list.d/*mmdebstrap*; "
                    f"printf '%s\\n' {shlex.quote(sources)} > \"$1/etc/apt/sources.list\"")
            with _status(progress, f"mmdebstrap {r.variant} {recipe.debian.suite} {arch} "
                         f"from {len(pins)} pinned packages") as say:
                mm.run_mmdebstrap(out=dest / "root.tar", mirror=f"deb [trusted=yes] file://{repo} ./",
                                  suite=recipe.debian.suite, components=recipe.debian.components,
                                  arch=arch, variant=r.variant, packages=[p.name for p in pins],
                                  timestamp=ctx.timestamp, progress=say, log=dest / "mmdebstrap.log",
                                  extra=[f"--hook-dir={HOOK_DIR}", f"--customize-hook={hook}"])
        finally:
            _remove(top)
        got = packages_in_tar(dest / "root.tar")
        want = sorted((p.name, p.version) for p in pins)
        if sorted((n, v) for n, v, _ in got) != want:
            have = {(n, v) for n, v, _ in got}
            odd = [f"{n} {v}" for n, v in want if (n, v) not in have][:5]
            raise ArmvmError("mmdebstrap did not install exactly the pinned root packages "
                             f"(not installed: {', '.join(odd) or 'none'}; installed "
                             f"{len(got)} of {len(want)})")
        (dest / "packages.json").write_text(json.dumps(got))

    tree = cache.put_tree(f"rootfs-pinned-{key}", build)
    from builder.publish.sbom import tar_licenses
    licenses = tar_licenses(tree / "root.tar", [p.name for p in pins])   # DEP-5, for the SBOM
    for p in pins:
        ctx.record("rootfs.debian", f"debian:{p.name}={p.version}", p.sha256, p.size,
                   filename=p.filename, **({"license": licenses[p.name]} if p.name in licenses else {}))
    return tree / "root.tar", "debian-pinned:" + key, _facts(recipe, tree, pinned=len(pins))
