"""The ext4 writer (mke2fs -d + debugfs normalising), judged by e2fsck -fn and debugfs stat:
owners, modes, setuid bits, symlinks, hard links and device nodes survive; the bytes are the
same for two staged copies with different access times; a mode-0000 file keeps its mode;
the rest of the target file stays untouched and sparse."""
from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from builder.disk.ext4 import fsck, write_ext4
from builder.payload.rootfs.stage import scan

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="stages owners and device nodes as root "
                                "(the unprivileged road is tested through fakeroot in test_rootfs.py)")
TS = 1700000000
MIB = 1 << 20


def make_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "home/user").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc/shadow-").write_text("root:*:1::::::\n")
    os.chmod(root / "etc/shadow-", 0)
    (root / "usr/bin/su").write_bytes(b"\x7fELF" + bytes(5000))
    os.chmod(root / "usr/bin/su", 0o4755)
    os.link(root / "usr/bin/su", root / "usr/bin/su-hard")
    os.symlink("../usr/bin/su", root / "etc/su-link")
    os.symlink("/usr/share/zoneinfo/" + "x" * 80, root / "etc/localtime")   # a slow symlink
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.chown(root / "home/user", 1000, 1000)
    (root / "home/user/notes").write_text("x" * 10000)
    os.chown(root / "home/user/notes", 1000, 100)
    os.chmod(root / "home/user", 0o750)


def build(tmp: Path, tree: Path, *, offset: int = MIB, size: int = 32 * MIB) -> Path:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    target = tmp / "disk.img"
    with open(target, "wb") as f:
        f.truncate(offset + size + MIB)
    paths, restore, _, _ = scan(tree, TS)
    write_ext4(target, offset=offset, size=size, tree=tree, fs_uuid=uuid.UUID(int=7),
               hash_seed=uuid.UUID(int=8), timestamp=TS, paths=paths, restore_modes=restore, work=work)
    return target


def debugfs(target: Path, request: str, offset: int = MIB) -> str:
    out = subprocess.run(["debugfs", "-R", request, f"{target}?offset={offset}"], capture_output=True,
                         text=True, check=True)
    return out.stdout


def test_metadata_survives_and_e2fsck_is_clean(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree)
    img = build(tmp_path, tree)
    ok, out = fsck(img, MIB)
    assert ok, out
    su = debugfs(img, "stat /usr/bin/su")
    assert "Mode:  04755" in su and "Links: 2" in su and "User:     0" in su
    hard = debugfs(img, "stat /usr/bin/su-hard")
    assert re.search(r"Inode: (\d+)", su).group(1) == re.search(r"Inode: (\d+)", hard).group(1)
    assert "Type: symlink" in debugfs(img, "stat /etc/su-link")
    assert "../usr/bin/su" in debugfs(img, "stat /etc/su-link")
    assert "x" * 80 in debugfs(img, "dump /etc/localtime /dev/stdout") or \
        "Type: symlink" in debugfs(img, "stat /etc/localtime")
    null = debugfs(img, "stat /dev/null")
    assert "Type: character special" in null and "Device major/minor number: 01:03" in null
    assert "Type: block special" in debugfs(img, "stat /dev/loop0")
    home = debugfs(img, "stat /home/user")
    assert "User:  1000   Group:  1000" in home and "Mode:  0750" in home
    notes = debugfs(img, "stat /home/user/notes")
    assert "User:  1000   Group:   100" in notes
    shadow = debugfs(img, "stat /etc/shadow-")
    assert "Mode:  0000" in shadow
    for line in su.splitlines():
        if line.strip().startswith(("ctime:", "atime:", "crtime:")):
            assert f"0x{TS:08x}:00000000" in line, line


def test_two_staged_copies_give_identical_bytes(tmp_path):
    digests = []
    for n in (1, 2):
        d = tmp_path / str(n)
        d.mkdir()
        make_tree(d / "tree")
        os.utime(d / "tree" / "etc/passwd", (n * 1000, TS - 5))     # different atime
        img = build(d, d / "tree")
        digests.append(hashlib.sha256(img.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_written_in_place_rest_of_file_untouched_and_sparse(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree)
    target = tmp_path / "disk.img"
    with open(target, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(0)
        f.write(b"HEAD" * 128)
        f.seek(64 * MIB - 512)
        f.write(b"TAIL" * 128)
    work = tmp_path / "w"
    work.mkdir()
    paths, restore, _, _ = scan(tree, TS)
    write_ext4(target, offset=4 * MIB, size=32 * MIB, tree=tree, fs_uuid=uuid.UUID(int=1),
               hash_seed=uuid.UUID(int=2), timestamp=TS, paths=paths, restore_modes=restore, work=work)
    data = target.read_bytes()
    assert data[:512] == b"HEAD" * 128 and data[-512:] == b"TAIL" * 128
    assert data[512:4 * MIB] == bytes(4 * MIB - 512)
    assert data[36 * MIB:-512] == bytes(28 * MIB - 512)
    assert os.stat(target).st_blocks * 512 < 16 * MIB          # still sparse
    assert fsck(target, 4 * MIB)[0]
