"""verify's ext2/3/4 reader, judged by e2fsprogs: images made by the real ``mke2fs -d``, every
directory listing, inode and file content compared with ``debugfs`` and the source tree."""
from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.verify import ext4
from builder.verify.blob import BytesBlob, FileBlob

pytestmark = pytest.mark.skipif(not (shutil.which("mke2fs") and shutil.which("debugfs")),
                                reason="needs e2fsprogs")
FRAG_BLOCKS = 900                       # alternating data/holes: 900 extents


def make_tree(root: Path) -> None:
    """Everything the reader must handle: merged-/usr symlinks, fast and slow symlinks,
    hard links, a directory big enough for an htree, a file fragmented enough for an
    extent index (depth > 0), sparse files, empty files, odd names."""
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/modules/6.1.0-99-test/kernel").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd").write_bytes(b"\x7fELF systemd\n")
    os.chmod(root / "usr/lib/systemd/systemd", 0o755)
    os.symlink("usr/sbin", root / "sbin")
    os.symlink("usr/lib", root / "lib")
    os.symlink("../lib/systemd/systemd", root / "usr/sbin/init")
    long_target = "/usr/lib/systemd/" + "/".join(["."] * 40) + "/systemd"   # > 60 bytes
    os.symlink(long_target, root / "slowlink")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("/nowhere/at/all", root / "dangling")
    big = root / "big"
    big.mkdir()
    for i in range(2500):
        (big / f"entry-with-a-longer-name-{i:05d}").write_bytes(b"%d\n" % i)
    os.link(big / "entry-with-a-longer-name-00007", root / "hardlink")
    (root / "empty").write_bytes(b"")
    (root / "name with spaces ü").write_bytes(b"unicode\n")
    data = os.urandom(1024)
    with open(root / "fragmented", "wb") as f:        # holes between every data block
        for i in range(FRAG_BLOCKS):
            f.seek(i * 8192)
            f.write(data[:512] + bytes([i & 0xFF]) * 512)
    with open(root / "sparse", "wb") as f:           # data far out: ext2's triple indirect
        for off in (0, 13 * 1024, 300 * 1024, 70 << 20):
            f.seek(off)
            f.write(b"X" * 100 + off.to_bytes(8, "little"))
    (root / "medium").write_bytes(os.urandom(300 * 1024 + 17))
    deep = root
    for i in range(12):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"deep\n")


VARIANTS = {
    "ext4": ("-t", "ext4"),
    "ext4-1k-blocks": ("-t", "ext4", "-b", "1024"),      # extent tree of depth 2
    "ext4-32bit-descriptors": ("-t", "ext4", "-O", "^64bit"),
    "ext4-no-extents": ("-t", "ext4", "-O", "^extent,^64bit", "-b", "1024"),
    "ext4-meta-bg": ("-t", "ext4", "-O", "meta_bg,^resize_inode", "-b", "1024"),
    "ext4-no-csum": ("-t", "ext4", "-O", "^metadata_csum"),
    "ext4-gdt-csum": ("-t", "ext4", "-O", "^metadata_csum,uninit_bg"),   # crc16 descriptors
    "ext4-inline-data": ("-t", "ext4", "-O", "inline_data"),     # small files in the inode
    "ext3": ("-t", "ext3", "-b", "1024"),
    "ext2": ("-t", "ext2", "-b", "1024"),
    "ext2-rev0": ("-t", "ext2", "-r", "0", "-b", "1024"),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree") / "root"
    root.mkdir()
    make_tree(root)
    return root


def mkfs(path: Path, args, tree: Path, size: str = "96M") -> Path:
    r = subprocess.run(["mke2fs", "-q", "-F", *args, "-E", "root_owner=0:0", "-d", str(tree),
                        str(path), size], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mke2fs {' '.join(args)} failed here: {r.stderr.strip()}")
    return path


def debugfs(img: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(img)], capture_output=True, text=True,
                          check=True).stdout


def debugfs_bytes(img: Path, cmd: str) -> bytes:
    return subprocess.run(["debugfs", "-R", cmd, str(img)], capture_output=True,
                          check=True).stdout


def ls_p(img: Path, path: str) -> dict:
    """name -> (inode, mode) from ``debugfs ls -p``."""
    out = {}
    for line in debugfs(img, f'ls -p "{path}"').splitlines():
        f = line.split("/")
        if len(f) >= 7 and f[1].isdigit():
            name = "/".join(f[5:-2])
            if name not in (".", "..") and int(f[1]):
                out[name] = (int(f[1]), int(f[2], 8))
    return out


def walk(fs: ext4.Ext4, path: str = "/", node=None):
    node = node or fs.inode(ext4.EXT4_ROOT_INO)
    yield path, node
    if node.is_dir and path != "/lost+found":
        for e in fs.list_dir(node):
            yield from walk(fs, path.rstrip("/") + "/" + e.name, fs.inode(e.ino))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def image(request, tree, tmp_path_factory):
    img = mkfs(tmp_path_factory.mktemp("img") / "fs.img", VARIANTS[request.param], tree)
    f = open(img, "rb")
    yield request.param, img, ext4.Ext4(FileBlob(f))
    f.close()


def test_reader_agrees_with_debugfs_and_the_tree(image, tree):
    name, img, fs = image
    assert ext4.sanity(fs) == [] and ext4.feature_problems(fs, "6.1.0") == []
    assert subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True).returncode == 0
    dirs = files = links = 0
    for path, node in walk(fs):
        if path == "/lost+found":
            continue
        src = tree / path.lstrip("/")
        st = os.lstat(src) if path != "/" else os.lstat(tree)
        assert node.mode & 0o170000 == st.st_mode & 0o170000, path
        if path != "/":
            assert node.mode & 0o7777 == st.st_mode & 0o7777, path
        if node.is_dir:
            dirs += 1
            mine = {e.name: e.ino for e in fs.list_dir(node)}
            theirs = ls_p(img, path)
            theirs.pop("lost+found", None)
            mine.pop("lost+found", None)
            assert mine == {k: v[0] for k, v in theirs.items()}, path
            assert set(mine) == set(os.listdir(src)), path
        elif node.is_symlink:
            links += 1
            assert fs.readlink(node) == os.readlink(src), path
        elif node.is_reg:
            files += 1
            if st.st_size < (1 << 20) or path == "/fragmented":
                assert fs.read(node, 1 << 27) == src.read_bytes(), path
            assert node.size == st.st_size and node.links == st.st_nlink, path
    assert dirs >= 17 and files >= 2508 and links == 7


def test_lookup_follows_symlinks_inside_the_file_system(image):
    name, img, fs = image
    init = fs.lookup("/sbin/init")
    assert init is not None and fs.read(init, 100) == b"\x7fELF systemd\n"
    assert fs.lookup("/sbin/init", follow=False).is_symlink
    assert fs.lookup("/lib/modules/6.1.0-99-test").is_dir
    assert fs.lookup("/usr/sbin/../sbin/init").ino == init.ino
    assert fs.lookup("/slowlink").ino == init.ino                        # slow symlink
    assert fs.lookup("/hardlink").ino == fs.lookup("/big/entry-with-a-longer-name-00007").ino
    assert fs.lookup("/dangling") is None and fs.lookup("/nope") is None
    assert fs.lookup("/empty/x") is None                              # not a directory
    with pytest.raises(ext4.Ext4Error, match="symlinks"):
        fs.lookup("/loop-a")
    stat = debugfs(img, "stat /sbin/init")
    assert "Type: symlink" in stat
    slow = debugfs(img, "stat /slowlink")
    if "inline" in name:        # a 99-byte target as inline data (i_block + system.data)
        assert fs.lookup("/slowlink", follow=False).flags & ext4.EXT4_INLINE_DATA_FL
    else:
        assert "Fast link dest" not in slow


def test_big_files_match_debugfs_cat(image):
    name, img, fs = image
    for path in ("/fragmented", "/medium", "/big/entry-with-a-longer-name-02499"):
        node = fs.lookup(path)
        theirs = debugfs_bytes(img, f"cat {path}")
        if node.flags & ext4.EXT4_INLINE_DATA_FL:   # debugfs prints all 60 bytes of i_block
            theirs = theirs[:node.size]
        assert fs.read(node, 1 << 27) == theirs, path
    stat = debugfs(img, "stat /fragmented")
    node = fs.lookup("/fragmented")
    assert f"Size: {node.size}" in stat and f"Links: {node.links}" in stat
    if name.startswith("ext4") and "no-extents" not in name:
        assert node.flags & ext4.EXT4_EXTENTS_FL
        depth = struct.unpack_from("<H", node.i_block, 6)[0]
        assert depth >= 1                       # needs an extent index node
        if "1k" in name:
            assert depth == 2
    if "no-extents" in name or name.startswith("ext2"):
        assert not node.flags & ext4.EXT4_EXTENTS_FL


def test_triple_indirect_sparse_file(image):
    name, img, fs = image
    node = fs.lookup("/sparse")
    assert node.size == (70 << 20) + 108
    with pytest.raises(ext4.Ext4Error, match="more than"):
        fs.read(node, 1 << 20)                  # bounded: the caller's limit wins
    data = fs.read(node, 1 << 27)
    for off in (0, 13 * 1024, 300 * 1024, 70 << 20):
        assert data[off:off + 108] == b"X" * 100 + off.to_bytes(8, "little")
    assert data.count(b"X") == 400
    if fs.block_size == 1024 and not node.flags & ext4.EXT4_EXTENTS_FL:
        assert struct.unpack("<15I", node.i_block)[14] != 0    # the triple indirect block


def test_superblock_fields_match_dumpe2fs(image):
    name, img, fs = image
    out = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True,
                         check=True).stdout
    info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines()
                                              if ":" in ln)}
    assert str(fs.uuid) == info["Filesystem UUID"]
    assert fs.blocks_count == int(info["Block count"])
    assert fs.sb["s_inodes_count"] == int(info["Inode count"])
    assert fs.block_size == int(info["Block size"])
    assert fs.inode_size == int(info.get("Inode size", 128))
    feats = set(info["Filesystem features"].split()) - {"(none)"}
    mine = set(ext4.feature_names(fs.compat, ext4.COMPAT) +
               ext4.feature_names(fs.incompat, ext4.INCOMPAT) +
               ext4.feature_names(fs.ro_compat, ext4.RO_COMPAT))
    assert mine == feats
    if "metadata_csum" in feats:
        assert fs.superblock_checksum_ok() is True
    if feats & {"metadata_csum", "uninit_bg"}:
        assert all(fs.desc_checksum_ok(g) for g in range(fs.group_count))
    else:
        assert fs.desc_checksum_ok(0) is None


def test_checksum_and_feature_problems_are_reported(tree, tmp_path):
    img = mkfs(tmp_path / "fs.img", ("-t", "ext4"), tree, "16M")
    raw = bytearray(img.read_bytes())
    fs = ext4.Ext4(BytesBlob(bytes(raw)))
    assert ext4.sanity(fs) == []
    assert ext4.feature_problems(fs, "3.2.0") == []       # nothing newer than 3.18 is on
    incompat = struct.unpack_from("<I", raw, 1024 + 0x60)[0]
    struct.pack_into("<I", raw, 1024 + 0x60, incompat | 0x80000000)
    fs = ext4.Ext4(BytesBlob(bytes(raw)))
    probs = ext4.feature_problems(fs)
    assert len(probs) == 1 and "0x80000000" in probs[0] and "refuses to mount" in probs[0]
    assert any("superblock checksum" in p for p in ext4.sanity(fs))
    # e2fsprogs agrees that the file system is now unusable
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(raw))
    r = subprocess.run(["dumpe2fs", "-h", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "unsupported feature" in r.stderr


def test_not_ext4_is_a_clean_error():
    for data in (b"", bytes(4096), b"\xff" * 4096):
        with pytest.raises(ext4.Ext4Error):
            ext4.Ext4(BytesBlob(data))


# --- hostile input -------------------------------------------------------------------------
FUZZ_SCRIPT = textwrap.dedent("""
    import sys
    from hypothesis import given, settings, strategies as st, HealthCheck
    from builder.verify import ext4
    from builder.verify.blob import BytesBlob

    base = open(sys.argv[1], "rb").read()
    regions = []                                        # (start, end) of metadata
    for item in sys.argv[2].split(","):
        off, n = map(int, item.split(":"))
        regions.append((off, off + n))
    mutation = st.tuples(st.integers(0, len(regions) - 1), st.integers(0, 1 << 30),
                         st.sampled_from(["bytes", "xor", "ff", "zero"]),
                         st.binary(min_size=1, max_size=8))

    def walk(fs, node, depth, budget):
        if depth > 20 or budget[0] <= 0:
            return
        for e in fs.list_dir(node):
            budget[0] -= 1
            if budget[0] <= 0:
                return
            child = fs.inode(e.ino)
            if child.is_dir:
                walk(fs, child, depth + 1, budget)
            elif child.is_symlink:
                fs.readlink(child)
            elif child.is_reg:
                fs.read(child, 1 << 24)

    @settings(max_examples=int(sys.argv[3]), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(muts=st.lists(mutation, min_size=1, max_size=8))
    def run(muts):
        img = bytearray(base)
        for region, pos, kind, data in muts:
            lo, hi = regions[region]
            off = lo + pos % max(1, hi - lo - len(data))
            orig = img[off:off + len(data)]
            new = {"bytes": data, "xor": bytes(a ^ (b or 1) for a, b in zip(orig, data)),
                   "ff": b"\\xff" * len(orig), "zero": bytes(len(orig))}[kind]
            img[off:off + len(orig)] = new[:len(orig)]
        try:
            fs = ext4.Ext4(BytesBlob(bytes(img)))
            ext4.sanity(fs)
            ext4.feature_problems(fs, "6.1.0")
            for p in ("/sbin/init", "/lib/modules/6.1.0-99-test", "/slowlink", "/loop-a",
                      "/small", "/big/entry-with-a-longer-name-02000"):
                fs.lookup(p)
            walk(fs, fs.inode(2), 0, [3000])
        except ext4.Ext4Error as e:
            assert str(e)

    run()
    print("FUZZ-OK")
""")


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (600, 600))


@pytest.mark.parametrize("mkfs_args", [("-t", "ext4", "-b", "1024", "-N", "2400"),
                                       ("-t", "ext4", "-O", "inline_data", "-N", "2400")],
                         ids=["extents-1k", "inline-data"])
def test_damaged_file_systems_fail_cleanly(tmp_path, mkfs_args):
    """Hypothesis mutates superblock, group descriptors, inode tables, directory and extent
    blocks of a small mke2fs image; every failure must be an Ext4Error, in bounded memory
    (RLIMIT_AS 768 MiB) and time (RLIMIT_CPU), in a child process so a regression fails
    instead of swapping."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "usr/sbin").mkdir(parents=True)
    (src / "usr/lib/systemd").mkdir(parents=True)
    (src / "usr/lib/modules/6.1.0-99-test").mkdir(parents=True)
    (src / "usr/lib/systemd/systemd").write_bytes(b"init\n" * 300)
    os.symlink("usr/sbin", src / "sbin")
    os.symlink("usr/lib", src / "lib")
    os.symlink("../lib/systemd/systemd", src / "usr/sbin/init")
    os.symlink("/usr/lib/systemd/" + "/".join(["."] * 30) + "/systemd", src / "slowlink")
    os.symlink("loop-b", src / "loop-a")
    os.symlink("loop-a", src / "loop-b")
    (src / "big").mkdir()
    for i in range(2100):
        (src / "big" / f"entry-with-a-longer-name-{i:05d}").write_bytes(b"x")
    with open(src / "frag", "wb") as f:
        for i in range(200):
            f.seek(i * 2048)
            f.write(b"d" * 1024)
    (src / "small").write_bytes(b"s" * 90)                # inline: i_block + system.data
    img = mkfs(tmp_path / "fs.img", mkfs_args, src, "8M")
    fs = ext4.Ext4(BytesBlob(img.read_bytes()))
    meta = {(1024, 0x180), (fs._desc_location(0), fs.desc_size)}   # superblock, descriptor
    for path in ("/", "/big", "/frag", "/usr", "/usr/lib/systemd/systemd", "/sbin",
                 "/slowlink", "/usr/sbin/init", "/loop-a", "/small", "/usr/lib"):
        node = fs.lookup(path, follow=False)
        g, idx = divmod(node.ino - 1, fs.sb["s_inodes_per_group"])
        meta.add((fs.group_desc(g)["inode_table"] * fs.block_size + idx * fs.inode_size,
                  fs.inode_size))
        for lblk, phys, n, _ in fs.runs(node)[:2]:
            meta.add((phys * fs.block_size, fs.block_size))      # directory / data blocks
        if node.flags & ext4.EXT4_EXTENTS_FL and struct.unpack_from("<H", node.i_block, 6)[0]:
            leaf = struct.unpack_from("<I", node.i_block, 16)[0]
            meta.add((leaf * fs.block_size, fs.block_size))      # an extent index's leaf
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    n = os.environ.get("ARMVM_EXT4_FUZZ_EXAMPLES", "200")
    r = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT, str(img),
                        ",".join(f"{o}:{n}" for o, n in sorted(meta)), n],
                       capture_output=True, text=True, preexec_fn=_limits, env=env, timeout=900)
    assert r.returncode == 0 and "FUZZ-OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("features", ["metadata_csum", "^metadata_csum,uninit_bg"])
def test_descriptor_checksum_damage_is_reported(tree, tmp_path, features):
    img = mkfs(tmp_path / "fs.img", ("-t", "ext4", "-O", features), tree, "16M")
    raw = bytearray(img.read_bytes())
    fs = ext4.Ext4(BytesBlob(bytes(raw)))
    off = fs._desc_location(0) + 0x0C                    # bg_free_blocks_count_lo
    raw[off] ^= 0x01
    probs = ext4.sanity(ext4.Ext4(BytesBlob(bytes(raw))))
    assert any("group descriptor checksum wrong for group(s) 0" in p for p in probs), probs
    bad = tmp_path / "bad.img"
    bad.write_bytes(bytes(raw))
    r = subprocess.run(["e2fsck", "-fn", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "checksum" in (r.stdout + r.stderr).lower()
