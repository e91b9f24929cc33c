"""extract_deb / read_control on .debs built in pure Python (tests/debrepo.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from builder.inputs.debian import deb as debmod
from builder.inputs.debian.deb import extract_deb, read_control
from builder.errors import ArmvmError
from tests.debrepo import ar_archive, kernel_entries, make_deb

ROOT = ("./", "dir", None, 0o755)
CONTROL = {"Package": "t", "Version": "1.0", "Architecture": "arm64",
           "Description": "test\n more"}
SAMPLE = [ROOT, ("./usr/", "dir", None, 0o755), ("./usr/bin/", "dir", None, 0o755),
          ("./usr/bin/tool", "file", b"#!/bin/sh\necho hi\n", 0o4755),
          ("./usr/bin/alias", "symlink", "tool", 0o777),
          ("./usr/share/abs", "symlink", "/usr/bin/tool", 0o777),
          ("./usr/bin/same", "hardlink", "./usr/bin/tool", 0o755)]


def listing(root: Path) -> list[tuple]:
    out = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out.append((rel, "l", os.readlink(path)))
        elif path.is_dir():
            out.append((rel, "d", ""))
        else:
            out.append((rel, "f", path.read_bytes()))
    return out


@pytest.mark.parametrize("comp", [".xz", ".gz", ".bz2", ".zst", ""])
def test_every_supported_compression(tmp_path, comp):
    deb = tmp_path / "t.deb"
    make_deb(deb, CONTROL, SAMPLE, data=comp, control_compression=comp)
    dest = tmp_path / "out"
    dest.mkdir()
    extract_deb(deb, dest)
    assert (dest / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "usr/bin/tool").stat().st_mode & 0o7777 == 0o755
    assert os.readlink(dest / "usr/bin/alias") == "tool"
    assert os.readlink(dest / "usr/share/abs") == "/usr/bin/tool"     # kept verbatim
    assert os.path.samefile(dest / "usr/bin/same", dest / "usr/bin/tool")
    assert (dest / "usr/bin/tool").stat().st_mtime == 1_700_000_000
    control = read_control(deb)
    assert control["Package"] == "t" and control["Architecture"] == "arm64"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_tree_matches_dpkg_deb(tmp_path):
    deb = tmp_path / "k.deb"
    entries = [e for e in kernel_entries("1.2.3-arm64") if e[1] != "chardev"] + SAMPLE[1:]
    make_deb(deb, CONTROL, entries)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    extract_deb(deb, ours)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(theirs)], check=True)
    assert listing(ours) == listing(theirs)


# A name no other process uses: a stale /tmp/planted on the host must not fail the test.
PLANTED = f"armvm-planted-{os.getpid()}-{uuid.uuid4().hex}"


@pytest.mark.parametrize("entries, message", [
    ([ROOT, ("/etc/passwd", "file", "x", 0o644)], "absolute path"),
    ([ROOT, ("./a/../../x", "file", "x", 0o644)], "contains '..'"),
    ([ROOT, ("./sub/", "dir", None, 0o755), ("./sub/up", "symlink", "../../outside", 0o777)],
     "points outside the package tree"),
    ([ROOT, ("./link", "hardlink", "../outside", 0o644)], "contains '..'"),
    ([ROOT, ("./link", "hardlink", "./never-extracted", 0o644)], "does not name a regular file"),
    ([ROOT, ("./tmpdir", "symlink", "/tmp", 0o777), (f"./tmpdir/{PLANTED}", "file", "x", 0o644)],
     "passes through the symlink tmpdir"),
    ([ROOT, ("./d", "symlink", ".", 0o777), ("./d/d/x", "file", "x", 0o644)],
     "passes through the symlink d"),
    ([ROOT, ("./f", "file", "x", 0o644), ("./l", "symlink", "f", 0o777),
      ("./h", "hardlink", "./l", 0o644)], "does not name a regular file"),
])
def test_escaping_members_are_refused(tmp_path, entries, message):
    deb = tmp_path / "evil.deb"
    make_deb(deb, CONTROL, entries)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArmvmError, match=message):
        extract_deb(deb, dest)
    assert not (tmp_path / "outside").exists() and not (Path("/tmp") / PLANTED).exists()


def test_device_nodes_are_skipped(tmp_path):
    deb = tmp_path / "d.deb"
    make_deb(deb, CONTROL, [ROOT, ("./null", "chardev", None, 0o666),
                            ("./f", "file", "x", 0o600)])
    (tmp_path / "out").mkdir()
    extract_deb(deb, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f"]


def test_unsupported_compression_names_it(tmp_path):
    deb = tmp_path / "l.deb"
    make_deb(deb, CONTROL, [ROOT], data=".lzma")
    (tmp_path / "out").mkdir()
    with pytest.raises(ArmvmError, match=r"'data.tar.lzma' uses an unsupported compression "
                                         r"'lzma' \(allowed: data.tar, data.tar.xz"):
        extract_deb(deb, tmp_path / "out")


def test_not_a_deb(tmp_path):
    (tmp_path / "x.deb").write_bytes(b"PK\x03\x04 zip, not ar")
    with pytest.raises(ArmvmError, match="not a .deb file"):
        read_control(tmp_path / "x.deb")
    (tmp_path / "y.deb").write_bytes(ar_archive([("debian-binary", b"2.0\n"),
                                                 ("data.tar.xz", b"\x00" * 100)])[:-50])
    with pytest.raises(ArmvmError, match="runs past the end"):
        extract_deb(tmp_path / "y.deb", tmp_path)
    (tmp_path / "z.deb").write_bytes(ar_archive([("debian-binary", b"2.0\n"),
                                                 ("data.tar.xz", b"not xz at all")]))
    with pytest.raises(ArmvmError, match="corrupt data archive"):
        extract_deb(tmp_path / "z.deb", tmp_path)


def test_expansion_is_bounded(tmp_path, monkeypatch):
    deb = tmp_path / "bomb.deb"
    make_deb(deb, CONTROL, [ROOT, ("./zeros", "file", b"\0" * 200_000, 0o644)])
    monkeypatch.setattr(debmod, "MAX_EXPANSION", 10)
    monkeypatch.setattr(debmod, "EXTRA_ALLOWANCE", 0)
    (tmp_path / "out").mkdir()
    with pytest.raises(ArmvmError, match="expands to more than 10x"):
        extract_deb(deb, tmp_path / "out")
