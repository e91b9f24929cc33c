"""Root hygiene: what a root built elsewhere needs before it boots as this image's root.

- the running kernel's modules, with a `modules.dep` made by `depmod -b` (udev loads nothing
  without it);
- /etc/hostname, /etc/hosts and an empty /etc/resolv.conf (mmdebstrap leaves the build
  host's), an empty /etc/machine-id (a missing one stops the boot at systemd-firstboot);
- /etc/fstab naming the root by file system UUID;
- root's password hash when the recipe gives one (otherwise root stays locked);
- DHCP on every Ethernet NIC through systemd-networkd, when asked;
- no SSH host keys baked into the image: a unit makes them on the first boot;
- /etc/.updated and /var/.updated: dpkg just configured the root, so the first boot skips
  the ConditionNeedsUpdate= jobs (ldconfig, hwdb, journal catalog) that are slow under TCG;
- units to enable, and the recipe's own files.

Every path is resolved inside the staged root as if it were `/` (symlinks in the root never
lead out of it), and nothing here runs a program of the root.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath
from typing import Optional

from builder.errors import ArmvmError

MAX_LINKS = 40
UNIT_DIRS = ("usr/lib/systemd/system", "lib/systemd/system", "etc/systemd/system")
SSH_KEYGEN_UNIT = """# Written by armvm-build: each image makes its own SSH host keys on its first boot (no
# key is baked into the image). Debian's sshd-keygen.service runs only when systemd sees
# a first boot, which an empty /etc/machine-id is not. Ed25519 and ECDSA only: an RSA key
# takes tens of seconds under emulation.
[Unit]
Description=Generate SSH host keys (armvm-build)
Before=ssh.service sshd.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key
ExecStart=/usr/bin/ssh-keygen -q -t ecdsa -N "" -f /etc/ssh/ssh_host_ecdsa_key

[Install]
WantedBy=multi-user.target ssh.service
"""
UPDATED_STAMP = """# Written by armvm-build: the root was just configured by dpkg, so the first boot
# need not redo ldconfig, the hwdb, the journal catalog... (ConditionNeedsUpdate=).
TIMESTAMP_NSEC={nsec}
"""
DHCP_NETWORK = """# Written by armvm-build: DHCP on every Ethernet NIC (virtio-net, xen-netfront, ...).
[Match]
Type=ether

[Network]
DHCP=yes
"""


def resolve_in(root: Path, rel: str, *, follow_last: bool = True) -> Path:
    """The host path of `rel` inside `root`, following the root's symlinks chroot-style."""
    root = Path(root)
    todo = [p for p in PurePosixPath(rel).parts if p not in ("/", ".", "")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if os.path.islink(here) and (todo or follow_last):
            links += 1
            if links > MAX_LINKS:
                raise ArmvmError(f"rootfs: too many symlinks resolving /{rel}")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in PurePosixPath(target).parts if p not in ("/", ".", "")] + todo
            continue
        done.append(part)
    return root.joinpath(*done)


def write_file(root: Path, rel: str, data: bytes, mode: int = 0o644, *, mtime: int,
               uid: int = 0, gid: int = 0) -> Path:
    """Replace /rel in the root (a symlink there is removed, never followed)."""
    path = resolve_in(root, rel, follow_last=False)
    make_dirs(root, str(path.parent.relative_to(root)), mtime=mtime)
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            raise ArmvmError(f"rootfs: /{rel} is a directory in the root, cannot write a file there")
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))
    return path


def make_dirs(root: Path, rel: str, *, mtime: int, mode: int = 0o755) -> Path:
    path = resolve_in(root, rel)
    missing = []
    p = path
    while not os.path.lexists(p) and p != root:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        os.mkdir(d, mode)
        os.chown(d, 0, 0)
        os.chmod(d, mode)
        os.utime(d, (mtime, mtime))
    if not path.is_dir():
        raise ArmvmError(f"rootfs: /{rel} is not a directory in the root")
    return path


def symlink(root: Path, rel: str, target: str, *, mtime: int) -> None:
    path = resolve_in(root, rel, follow_last=False)
    make_dirs(root, str(path.parent.relative_to(root)), mtime=mtime)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)
    os.lchown(path, 0, 0)
    os.utime(path, (mtime, mtime), follow_symlinks=False)


def install_modules(root: Path, modules_dir: Path, version: str, *, mtime: int) -> Path:
    """Copy the kernel's lib/modules/<version> into the root and run depmod there."""
    dest_parent = make_dirs(root, "lib/modules", mtime=mtime)
    if dest_parent.parent.name != "lib" or root.resolve() not in dest_parent.resolve().parents:
        raise ArmvmError(f"rootfs: /lib/modules resolves to /{dest_parent.relative_to(root)} in the root; "
                         "expected /lib/modules or /usr/lib/modules")
    dest = dest_parent / version
    if os.path.lexists(dest):
        shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else os.unlink(dest)
    shutil.copytree(modules_dir, dest, symlinks=True, ignore=shutil.ignore_patterns("build", "source"))
    base = dest_parent.parent.parent      # depmod -b BASE reads BASE/lib/modules/<version>
    try:
        proc = subprocess.run(["depmod", "-b", str(base), version], capture_output=True,
                              text=True, timeout=600)
    except FileNotFoundError:
        raise ArmvmError("'depmod' was not found (needed to index the root's kernel modules); "
                         "install the Debian package 'kmod'") from None
    if proc.returncode != 0:
        raise ArmvmError(f"depmod -b {base} {version} failed: {proc.stderr.strip()[-500:]}")
    if not (dest / "modules.dep").is_file():
        raise ArmvmError(f"depmod wrote no modules.dep for {version}")
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            os.lchown(p, 0, 0)
            os.utime(p, (mtime, mtime), follow_symlinks=False)
    os.lchown(dest, 0, 0)
    os.utime(dest, (mtime, mtime))
    return dest


def set_root_password(root: Path, password_hash: str, *, mtime: int) -> None:
    shadow = resolve_in(root, "etc/shadow", follow_last=False)
    if not shadow.is_file() or shadow.is_symlink():
        raise ArmvmError("rootfs: the root has no /etc/shadow to set root's password in")
    st = os.lstat(shadow)
    lines = shadow.read_bytes().decode("utf-8", "replace").splitlines()
    found = False
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            fields[1] = password_hash
            lines[i] = ":".join(fields)
            found = True
    if not found:
        raise ArmvmError("rootfs: /etc/shadow of the root has no 'root' entry")
    write_file(root, "etc/shadow", ("\n".join(lines) + "\n").encode(), stat.S_IMODE(st.st_mode),
               mtime=mtime, uid=st.st_uid, gid=st.st_gid)


def enable_unit(root: Path, unit: str, *, mtime: int) -> None:
    """systemctl enable, done by hand: a wants/ symlink per WantedBy= of the unit's [Install]."""
    found: Optional[Path] = None
    for d in UNIT_DIRS:
        p = resolve_in(root, f"{d}/{unit}")
        if p.is_file():
            found = p
            break
    if found is None:
        raise ArmvmError(f"rootfs: unit {unit!r} is not in the root (looked in "
                         f"{', '.join('/' + d for d in UNIT_DIRS)}); add the package that ships it")
    wanted_by, section = [], ""
    for line in found.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]" and line.startswith(("WantedBy=", "RequiredBy=")):
            kind = "wants" if line.startswith("WantedBy=") else "requires"
            wanted_by += [(t, kind) for t in line.split("=", 1)[1].split()]
    if not wanted_by:
        raise ArmvmError(f"rootfs: unit {unit!r} has no WantedBy= in its [Install] section")
    rel_target = "/" + str(found.relative_to(root))
    for target, kind in wanted_by:
        symlink(root, f"etc/systemd/system/{target}.{kind}/{unit}", rel_target, mtime=mtime)


def apply(root: Path, *, hostname: str, fs_uuid: str, fstype: str, mtime: int,
          password_hash: Optional[str], dhcp: bool, enable: list, files: list) -> None:
    """Every hygiene step except the kernel modules (see install_modules)."""
    write_file(root, "etc/hostname", f"{hostname}\n".encode(), mtime=mtime)
    write_file(root, "etc/hosts", (f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
                                   "::1\t\tlocalhost ip6-localhost ip6-loopback\n").encode(), mtime=mtime)
    write_file(root, "etc/resolv.conf", b"", mtime=mtime)
    write_file(root, "etc/machine-id", b"", 0o444, mtime=mtime)
    write_file(root, "etc/fstab", (f"# Written by armvm-build: the root by file system UUID.\n"
                                   f"UUID={fs_uuid}\t/\t{fstype}\terrors=remount-ro\t0\t1\n").encode(),
               mtime=mtime)
    if password_hash:
        set_root_password(root, password_hash, mtime=mtime)
    if dhcp:
        write_file(root, "etc/systemd/network/20-armvm-dhcp.network", DHCP_NETWORK.encode(), mtime=mtime)
        enable = ["systemd-networkd.service"] + [u for u in enable if u != "systemd-networkd.service"]
    ssh = resolve_in(root, "etc/ssh")
    if (ssh / "sshd_config").is_file():
        for key in sorted(ssh.glob("ssh_host_*_key*")):
            if key.is_symlink() or key.is_file():
                os.unlink(key)
        write_file(root, "etc/systemd/system/armvm-ssh-keygen.service", SSH_KEYGEN_UNIT.encode(), mtime=mtime)
        enable = ["armvm-ssh-keygen.service"] + list(enable)
    for stamp in ("etc/.updated", "var/.updated"):
        if resolve_in(root, stamp.split("/")[0]).is_dir():
            write_file(root, stamp, UPDATED_STAMP.format(nsec=mtime * 1_000_000_000).encode(), mtime=mtime)
    for src, dest, mode in files:        # before enabling: a recipe may ship its own unit
        parent = str(PurePosixPath(dest).parent)
        if parent not in ("", "."):
            make_dirs(root, parent, mtime=mtime, mode=0o700 if parent.endswith(".ssh") else 0o755)
        write_file(root, dest, Path(src).read_bytes(), mode, mtime=mtime)
    for unit in enable:
        enable_unit(root, unit, mtime=mtime)
