"""Write an ext4 file system from a staged directory tree into a (sparse) file, rootless.

The writer is e2fsprogs' `mke2fs -d DIR` (1.47.0 cannot read tarballs) with everything that
varies pinned: our own mke2fs.conf (the host's defaults never leak in), `-U`, `-E hash_seed=`,
`E2FSPROGS_FAKE_TIME`, then one debugfs pass that sets every inode's atime/ctime/crtime
(mke2fs copies them from the staged tree) to the build timestamp and restores the modes of
files that had to be made readable for mke2fs (mode 0000 under fakeroot).

Run it inside the same fakeroot session that staged the tree when unprivileged, so the
ownership recorded by fakeroot is what mke2fs sees.
"""
from __future__ import annotations

import os
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Tuple

from builder.errors import ArmvmError

BLOCK_SIZE = 4096
INODE_SIZE = 256
# Features every kernel we target (Debian cloud-arm64 / armmp-lpae >= 5.10) mounts; no
# orphan_file (needs 5.15) so that the image also suits older guests.
FEATURES = "has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize"
MKE2FS_CONF = f"""[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tblocksize = {BLOCK_SIZE}
\tinode_size = {INODE_SIZE}
\tinode_ratio = 16384
\treserved_ratio = 5.0
\tlazy_itable_init = false
\tlazy_journal_init = false
[fs_types]
\text4 = {{
\t\tfeatures = {FEATURES}
\t}}
"""
TIMEOUT = 1800


@dataclass(frozen=True)
class Ext4Result:
    uuid: uuid.UUID
    blocks: int
    inodes: int


def tool_version() -> str:
    """mke2fs's version string (part of cache keys: another e2fsprogs may write other bytes)."""
    try:
        out = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ArmvmError("mke2fs not found: install the Debian package e2fsprogs") from None
    m = re.search(r"mke2fs ([0-9.]+)", out.stderr + out.stdout)
    return m.group(1) if m else "unknown"


def estimate_bytes(total_file_blocks: int, inodes: int, size_hint: int) -> int:
    """Bytes an ext4 holding this content needs (data + inode tables + journal + reserve)."""
    journal = 16 << 20 if size_hint < (1 << 30) else 64 << 20
    meta = inodes * INODE_SIZE * 2 + (4 << 20)
    data = total_file_blocks * BLOCK_SIZE
    return int((data + meta + journal) / 0.93) + (1 << 20)


def _debugfs_quote(path: str) -> str:
    if any(c in path for c in '"\n\\'):
        raise ArmvmError(f"ext4: file name {path!r} cannot be passed to debugfs")
    return f'"{path}"'


def write_ext4(target: Path, *, offset: int, size: int, tree: Path, fs_uuid: uuid.UUID,
               hash_seed: uuid.UUID, timestamp: int, paths: Iterable[str],
               restore_modes: Sequence[Tuple[str, int]] = (), work: Path,
               label: str = "root") -> Ext4Result:
    """Make an ext4 of `size` bytes at `offset` of `target` holding `tree`.

    `paths` lists one path (relative, '/'-separated) per inode of the tree; every one gets
    its times normalised. `restore_modes` are (path, full st_mode) pairs set after creation.
    """
    if offset % BLOCK_SIZE or size < 64 * BLOCK_SIZE:
        raise ArmvmError(f"ext4: offset {offset} must be a multiple of {BLOCK_SIZE} and the size "
                         f"{size} at least {64 * BLOCK_SIZE} bytes")
    blocks = size // BLOCK_SIZE          # a partial last block stays unused
    conf = work / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    env = dict(os.environ, MKE2FS_CONFIG=str(conf), E2FSPROGS_FAKE_TIME=str(timestamp),
               MKE2FS_SYNC="0", LC_ALL="C")
    env.pop("MKE2FS_DEVICE_SECTSIZE", None)
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-L", label,
           "-U", str(fs_uuid), "-E", f"offset={offset},hash_seed={hash_seed},nodiscard",
           "-d", str(tree), str(target), str(blocks)]
    _run(cmd, env, "mke2fs")
    # One debugfs session: times of every inode, then modes mke2fs could not read through.
    script = work / "debugfs.cmds"
    with open(script, "w") as f:
        for p in ["/"] + ["/" + p for p in paths]:
            q = _debugfs_quote(p)
            for fld in ("atime", "ctime", "crtime"):
                f.write(f"sif {q} {fld} @{timestamp}\n")
            for fld in ("atime_extra", "ctime_extra", "crtime_extra", "mtime_extra"):
                f.write(f"sif {q} {fld} 0\n")
        for p, mode in restore_modes:
            f.write(f"sif {_debugfs_quote('/' + p)} mode 0{mode:o}\n")
    # unix_io's option string "FILE?offset=N" opens a file system inside a larger file.
    dev = f"{target}?offset={offset}" if offset else str(target)
    out = _run(["debugfs", "-w", "-f", str(script), dev], env, "debugfs")
    errors = [line for line in out.splitlines() if line.strip() and not line.startswith("debugfs")]
    if errors:
        raise ArmvmError("debugfs (normalising inode times): " + "; ".join(errors[:5]))
    return Ext4Result(fs_uuid, blocks, 0)


def _run(cmd, env, what: str) -> str:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise ArmvmError(f"{cmd[0]} not found: install the Debian package e2fsprogs") from None
    except subprocess.TimeoutExpired:
        raise ArmvmError(f"{what} did not finish within {TIMEOUT} s") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise ArmvmError(f"{what} failed (exit {proc.returncode}): " + " | ".join(msg[-5:]))
    return proc.stderr + proc.stdout


def fsck(target: Path, offset: int = 0) -> Tuple[bool, str]:
    """e2fsck -fn: (clean?, output) — the external judge."""
    dev = f"{target}?offset={offset}" if offset else str(target)
    proc = subprocess.run(["e2fsck", "-fn", dev], capture_output=True, text=True, timeout=600)
    return proc.returncode == 0, proc.stdout + proc.stderr
