"""One session that turns a root source into an ext4 file: extract (or copy) the source into
a staging folder, apply the hygiene, then mke2fs + debugfs.

Unprivileged, the whole session runs under one `fakeroot` (`python -m builder.payload.rootfs.stage
PLAN.json`), so the owners and device nodes the extraction recorded are what mke2fs reads;
as root it runs the same code directly. The plan and the result are plain JSON.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import uuid
from pathlib import Path

from builder.errors import ArmvmError

MIB = 1024 * 1024


def copy_dir(src: Path, dest: Path) -> None:
    """Copy a root folder keeping owners, modes, times, symlinks, hard links and device nodes
    (its ownership on disk is taken as the truth)."""
    seen: dict = {}

    def one(s: str, d: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and key in seen:
            os.link(seen[key], d)
            return
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(d, 0o700)
        elif stat.S_ISREG(st.st_mode):
            with open(s, "rb") as fi, open(d, "xb") as fo:
                while True:
                    n = os.copy_file_range(fi.fileno(), fo.fileno(), 1 << 30) \
                        if hasattr(os, "copy_file_range") else 0
                    if n == 0:
                        break
                if os.fstat(fo.fileno()).st_size != st.st_size:
                    fo.seek(0)
                    fi.seek(0)
                    fo.truncate()
                    fo.write(fi.read())
            seen[key] = d
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            os.mknod(d, st.st_mode, st.st_rdev)
        else:
            return          # sockets are not stored
        os.lchown(d, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(d, stat.S_IMODE(st.st_mode))

    try:
        dirs = []
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            out = dest if rel == "." else dest / rel
            for n in sorted(dirnames + filenames):
                s = os.path.join(dirpath, n)
                d = os.path.join(out, n)
                st = os.lstat(s)
                one(s, d, st)
                if stat.S_ISDIR(st.st_mode):
                    dirs.append((d, st))
                elif not stat.S_ISLNK(st.st_mode):
                    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
            dirnames[:] = [n for n in dirnames if not os.path.islink(os.path.join(dirpath, n))]
        st = os.lstat(src)
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        os.chown(dest, st.st_uid, st.st_gid)
        for d, st in reversed(dirs):
            os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    except OSError as exc:
        raise ArmvmError(f"rootfs dir {src}: cannot copy {exc.filename}: {exc.strerror}") from None


def scan(root: Path, timestamp: int):
    """-> (one relative path per inode, modes to restore, data blocks, inode count).

    Clamps every mtime newer than the timestamp, and makes files mke2fs could not read
    (mode without owner read, e.g. /etc/shadow-) readable, returning their real modes."""
    paths, restore = [], []
    seen = set()
    blocks = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames) + sorted(filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            rel = os.path.relpath(p, root)
            paths.append(rel)
            if stat.S_ISREG(st.st_mode):
                blocks += -(-st.st_size // 4096)
                if not st.st_mode & stat.S_IRUSR:
                    restore.append((rel, st.st_mode))
                    os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IRUSR)
            elif stat.S_ISDIR(st.st_mode):
                blocks += 1
                if (st.st_mode & 0o500) != 0o500:
                    restore.append((rel, st.st_mode))
                    os.chmod(p, stat.S_IMODE(st.st_mode) | 0o500)
            elif stat.S_ISLNK(st.st_mode) and st.st_size > 59:
                blocks += 1
            if st.st_mtime > timestamp or st.st_mtime_ns % 1_000_000_000:
                m = min(int(st.st_mtime), timestamp)
                os.utime(p, (m, m), follow_symlinks=False)
    st = os.lstat(root)
    if st.st_mtime > timestamp:
        os.utime(root, (timestamp, timestamp))
    return paths, restore, blocks, len(paths) + 1


def installed_packages(root: Path) -> list:
    """(name, version, architecture) of every installed package in the root's dpkg status."""
    from builder.payload.rootfs.hygiene import resolve_in
    status = resolve_in(root, "var/lib/dpkg/status")
    if not status.is_file():
        return []
    from builder.payload.rootfs.repo import parse_status
    return [list(p) for p in parse_status(status.read_text(errors="replace"))]


def run(plan: dict) -> dict:
    from builder.disk.ext4 import estimate_bytes, write_ext4
    from builder.payload.rootfs import hygiene
    from builder.payload.rootfs.tarball import extract_tar
    staging = Path(plan["staging"])
    staging.mkdir(mode=0o755)
    src = plan["source"]
    ts = plan["timestamp"]
    if src["kind"] == "tar":
        extract_tar(Path(src["path"]), staging)
    else:
        copy_dir(Path(src["path"]), staging)
    h = plan["hygiene"]
    hygiene.apply(staging, hostname=h["hostname"], fs_uuid=plan["ext4"]["uuid"], fstype="ext4", mtime=ts,
                  password_hash=h.get("password_hash"), dhcp=h.get("dhcp", False),
                  enable=h.get("enable", []), files=h.get("files", []))
    if plan.get("modules"):
        hygiene.install_modules(staging, Path(plan["modules"]["dir"]), plan["modules"]["version"], mtime=ts)
    for need in ("sbin/init",):
        p = hygiene.resolve_in(staging, need)
        if not os.path.lexists(p):
            raise ArmvmError(f"the root has no /{need}: it cannot boot (add systemd-sysv or another init)")
    packages = installed_packages(staging)
    paths, restore, blocks, inodes = scan(staging, ts)
    e = plan["ext4"]
    need = estimate_bytes(blocks, inodes, e["size"])
    if need > e["size"]:
        raise ArmvmError(f"the root ({blocks * 4096 // MIB} MiB of files, {inodes} inodes) does not fit "
                         f"its {e['size'] // MIB} MiB partition: it needs about {-(-need // MIB)} MiB; "
                         "grow disk.size (the last partition fills the disk) or the root partition's size")
    target = Path(e["target"])
    with open(target, "wb") as f:
        f.truncate(e["offset"] + e["size"])
    try:
        write_ext4(target, offset=e["offset"], size=e["size"], tree=staging, fs_uuid=uuid.UUID(e["uuid"]),
                   hash_seed=uuid.UUID(e["hash_seed"]), timestamp=ts, paths=paths,
                   restore_modes=restore, work=Path(plan["work"]), label=e.get("label", "root"))
    except ArmvmError as exc:
        if "Could not allocate" in str(exc) or "No space" in str(exc):
            raise ArmvmError(f"the root does not fit its {e['size'] // MIB} MiB partition "
                             f"(estimated need {-(-need // MIB)} MiB): {exc}") from None
        raise
    return {"packages": packages, "inodes": inodes, "data_bytes": blocks * 4096, "needed_bytes": need}


def main(argv) -> int:
    plan = json.loads(Path(argv[1]).read_text())
    try:
        result = run(plan)
    except ArmvmError as exc:
        Path(plan["result"]).write_text(json.dumps({"error": str(exc)}))
        return 1
    except OSError as exc:
        Path(plan["result"]).write_text(json.dumps(
            {"error": f"staging the root failed: {exc.filename or ''}: {exc.strerror}"}))
        return 1
    Path(plan["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
