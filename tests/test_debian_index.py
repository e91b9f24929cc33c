"""The streaming Packages scan (builder/inputs/debian/index.py) against python-debian's own parse
of the same text, cut into pieces at every kind of boundary."""
from __future__ import annotations

import gzip
import lzma
import random

import pytest

from builder.inputs.debian.index import MAX_PARAGRAPH, Index, IndexStream, build_index
from builder.errors import ArmvmError

TEXT = (
    "Package: alpha\nVersion: 1.0-1\nArchitecture: arm64\nDescription: first\n long text\n"
    " .\n more\nFilename: pool/a/alpha_1.0-1_arm64.deb\nSize: 100\nSHA256: " + "a" * 64 + "\n"
    "Depends: libc6 (>= 2.36),\n libfoo | libbar,\n\tzlib1g\nProvides: virt-a, virt-b (= 1)\n\n"
    "Package: beta\nArchitecture: all\nVersion: 2\nFilename: pool/b/beta_2_all.deb\n"
    "Size: 7\nSHA256: " + "b" * 64 + "\nProvides: virt-a\n\n"
    "package: gamma\nversion: 3\narchitecture: arm64\nfilename: pool/g/g.deb\nsize: x\n"
    "sha256: " + "c" * 64 + "\n\n"
    "Package: alpha\nVersion: 1.0-2\nArchitecture: arm64\nFilename: pool/a/alpha_1.0-2.deb\n"
    "Size: 101\nSHA256: " + "d" * 64 + "\n\n"
    "Package: alpha\nVersion: 1.0~rc1\nArchitecture: arm64\nFilename: pool/a/old.deb\n"
    "Size: 1\nSHA256: " + "e" * 64 + "\n\n"
    "Description: a paragraph without a name\n\n"
    "Package: delta\nVersion: 1\nArchitecture: arm64\nFilename: pool/d.deb\nSize: 3\n"
    "SHA256: " + "f" * 64 + "\nDepends: beta")           # no final newline


def expected(text: str) -> dict:
    from debian.deb822 import Packages
    from debian.debian_support import Version
    best = {}
    for p in Packages.iter_paragraphs(text.splitlines(True), use_apt_pkg=False):
        f = {k.lower(): v for k, v in p.items()}
        if not f.get("package"):
            continue
        try:
            size = int(f.get("size", "-1"))
        except ValueError:
            size = -1
        row = (f["package"], f.get("version", ""), f.get("architecture", ""),
               f.get("filename", ""), f.get("sha256", ""), size,
               " ".join(f.get("depends", "").split()))
        if row[0] not in best or Version(row[1]) > Version(best[row[0]][1]):
            best[row[0]] = row
    return best


def scan(tmp_path, data: bytes, compression: str, pieces: list[int]) -> Index:
    dest = tmp_path / f"idx{random.random()}"
    dest.mkdir()
    stream = IndexStream(compression, 1 << 30, "test/Packages", dest)
    pos = 0
    for n in pieces + [len(data)]:
        stream.feed(data[pos:pos + n])
        pos += n
    stream.finish()
    return Index(dest / "packages.sqlite")


@pytest.mark.parametrize("compression", ["", ".xz", ".gz"])
def test_scan_matches_python_debian_at_any_cut(tmp_path, compression):
    raw = TEXT.encode()
    data = {"": raw, ".xz": lzma.compress(raw), ".gz": gzip.compress(raw)}[compression]
    want = expected(TEXT)
    rng = random.Random(13)
    cuts = [[], [1] * len(data)] + [[rng.randint(1, 40) for _ in range(200)] for _ in range(5)]
    for pieces in cuts:
        index = scan(tmp_path, data, compression, pieces)
        assert sorted(index.names()) == sorted(want)
        for name, row in want.items():
            assert index.get(name) == row, (name, pieces[:5])
        assert index.providers("virt-a") == ["alpha", "beta"]
        assert index.providers("virt-b") == ["alpha"]
    assert want["alpha"][1] == "1.0-2" and want["gamma"][5] == -1     # the fixture's point


def test_concatenated_xz_streams_and_gzip_members(tmp_path):
    a, b = TEXT.encode().split(b"Package: beta")
    for data, comp in ((lzma.compress(a) + lzma.compress(b"Package: beta" + b), ".xz"),
                       (gzip.compress(a) + gzip.compress(b"Package: beta" + b), ".gz")):
        index = scan(tmp_path, data, comp, [7] * 50)
        assert index.get("beta")[1] == "2" and index.get("delta") is not None


def test_truncated_and_corrupt_streams_are_clear_errors(tmp_path):
    data = lzma.compress(TEXT.encode() * 50)
    with pytest.raises(ArmvmError, match="ends early"):
        scan(tmp_path, data[:len(data) // 2], ".xz", [])
    with pytest.raises(ArmvmError, match="cannot decompress"):
        scan(tmp_path, b"\xfd7zXZ\x00garbage" * 10, ".xz", [])


def test_budget_and_paragraph_bounds(tmp_path):
    (tmp_path / "a").mkdir()
    stream = IndexStream("", 100, "test/Packages", tmp_path / "a")
    with pytest.raises(ArmvmError, match="larger than its Release entry allows"):
        stream.feed(b"x" * 101)
    stream.close()
    with pytest.raises(ArmvmError, match="paragraph is longer than"):
        scan(tmp_path, b"Package: a\nDescription: " + b"y" * (MAX_PARAGRAPH + 10), "",
             [1 << 20] * 17)


def test_xz_bomb_stops_at_the_budget(tmp_path):
    """100 MB of zeros compress to ~15 KB; the budget stops the decoder long before."""
    packages = tmp_path / "Packages.xz"
    packages.write_bytes(lzma.compress(b"\0" * (100 << 20)))
    (tmp_path / "t").mkdir()
    with pytest.raises(ArmvmError, match="larger than its Release entry allows"):
        build_index(packages, ".xz", tmp_path / "t", 2 << 20, "test/Packages.xz")


def test_invalid_utf8_is_replaced_not_a_traceback(tmp_path):
    data = b"Package: bad\nVersion: 1\xff\nArchitecture: arm64\nFilename: p.deb\nSize: 1\n"
    index = scan(tmp_path, data, "", [])
    assert index.get("bad")[1] == "1\ufffd"
