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
    from builder.kernel import decompress_module, elf_section, norm, parse_modinfo
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
    from builder.kernel import norm
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
    from builder.cache import Cache
    from builder.disk.ext4 import tool_version
    from builder.layout import root_fs_ids, root_partition_number
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
            from builder.rootfs.tarball import check_tar
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
    from builder.rootfs import stage
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
        proc = subprocess.run(["fakeroot", "--", sys.executable, "-m", "builder.rootfs.stage", str(plan_file)],
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
    """(tarball path, identity, facts) of the mmdebstrap root, built once per content key."""
    from builder.rootfs import mmdebstrap as mm
    recipe, r = ctx.recipe, ctx.recipe.rootfs
    archive = ctx.need_archive("rootfs.debian")
    arch = spec.ARCHES[recipe.arch].debian_arch
    pinned = []
    with ctx.stage("resolve"):
        for name in r.packages:
            if archive.lock is not None:
                # The lock pins the image's own packages, not (yet) the root's closure.
                pinned.append((name, ""))
                continue
            try:
                pkg = archive.resolve(name)
            except ArmvmError as exc:
                raise ArmvmError(f"{recipe.path}: field 'rootfs.debian.packages': {exc}") from None
            pinned.append((pkg.name, pkg.version))
    key = mm.cache_key(suite=recipe.debian.suite, components=recipe.debian.components, arch=arch,
                       variant=r.variant, packages=pinned, timestamp=ctx.timestamp)

    def build(dest: Path) -> None:          # only on a cache miss: a warm build needs no tools
        if archive.offline:
            raise ArmvmError("the Debian root of this recipe is not in the cache, and --offline forbids "
                             "running mmdebstrap (it downloads); build once online with the same cache")
        mm.check_tools(arch, r.variant)
        (dest / "mmdebstrap.version").write_text(mm.mmdebstrap_version() + "\n")
        with _status(progress, f"mmdebstrap {r.variant} {recipe.debian.suite} {arch}") as say:
            mm.run_mmdebstrap(out=dest / "root.tar", mirror=archive.mirror, suite=recipe.debian.suite,
                              components=recipe.debian.components, arch=arch, variant=r.variant,
                              packages=r.packages, timestamp=ctx.timestamp,
                              keyring=archive.keyring if archive.keyring.is_file() else None,
                              progress=say, log=dest / "mmdebstrap.log")

    tree = cache.put_tree(f"rootfs-debian-{key}", build)
    facts = {"variant": r.variant, "suite": recipe.debian.suite, "arch": arch, "include": list(r.packages),
             "version": (tree / "mmdebstrap.version").read_text().strip()}
    return tree / "root.tar", "debian:" + key, facts
