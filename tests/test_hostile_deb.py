"""Hostile .debs (issue 9 item 1): header bombs built with the real tar/zstd/ar tools are
refused quickly, in bounded memory, with a short message; a hypothesis fuzz of the reader
runs under RLIMIT_AS. Every extraction runs in a child process with resource limits."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.limits import run_limited

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("tar", "zstd", "ar", "xz")),
                                reason="needs tar, zstd (zstd), ar (binutils), xz (xz-utils)")
BOMB_BYTES = 1536 << 20          # what the header declares: 1.5 GiB
EXTRACT = """
import sys
from builder.inputs.debian.deb import extract_deb, read_control
from builder.errors import ArmvmError
deb, dest, what = sys.argv[1:4]
try:
    read_control(deb) if what == "control" else extract_deb(deb, dest)
except ArmvmError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
print("extracted")
"""


def _header(kind: bytes, size: int, name: str = "././@LongLink") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT)


def _real_deb(d: Path, data_member: Path) -> Path:
    """A .deb assembled by the real tools: tar + xz for control, ar for the archive."""
    ctl = d / "ctl"
    ctl.mkdir()
    (ctl / "control").write_text("Package: bomb\nVersion: 1\nArchitecture: all\n")
    (d / "debian-binary").write_text("2.0\n")
    subprocess.run(["tar", "-cJf", str(d / "control.tar.xz"), "-C", str(ctl), "./control"],
                   check=True)
    deb = d / "bomb.deb"
    subprocess.run(["ar", "rc", str(deb), "debian-binary", "control.tar.xz", data_member.name],
                   check=True, cwd=d)
    return deb


@pytest.fixture(scope="module")
def zeros_frame(tmp_path_factory) -> bytes:
    """1.5 GiB of zeros compressed by the zstd program (~50 KB), made once."""
    out = tmp_path_factory.mktemp("zeros") / "zeros.zst"
    with open(out, "wb") as f:
        proc = subprocess.Popen(["zstd", "-q", "-c"], stdin=subprocess.PIPE, stdout=f)
        zeros = bytes(1 << 20)
        for _ in range(BOMB_BYTES // len(zeros)):
            proc.stdin.write(zeros)
        proc.stdin.close()
        assert proc.wait() == 0
    return out.read_bytes()


def _zstd_bomb(d: Path, header: bytes, zeros: bytes, member: str = "data.tar.zst") -> Path:
    """The header as one zstd frame (by the zstd program), then the zeros frame: zstd
    decoders read concatenated frames as one stream."""
    head = subprocess.run(["zstd", "-q", "-c"], input=header, capture_output=True, check=True)
    out = d / member
    out.write_bytes(head.stdout + zeros)
    check = subprocess.run(["zstd", "-q", "-l", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    return out


@pytest.mark.parametrize("kind, what", [(tarfile.GNUTYPE_LONGNAME, "GNU long-name"),
                                        (tarfile.GNUTYPE_LONGLINK, "GNU long-link"),
                                        (tarfile.XHDTYPE, "PAX"),
                                        (tarfile.XGLTYPE, "PAX global")])
def test_header_bomb_is_refused_in_bounded_memory(tmp_path, zeros_frame, kind, what):
    deb = _real_deb(tmp_path, _zstd_bomb(tmp_path, _header(kind, BOMB_BYTES), zeros_frame))
    assert deb.stat().st_size < 200_000
    listed = subprocess.run(["ar", "t", str(deb)], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == ["debian-binary", "control.tar.xz", "data.tar.zst"]
    out = tmp_path / "out"
    out.mkdir()
    r = run_limited(EXTRACT, mem_mib=384, cpu_s=30, args=[deb, out, "data"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"a {what} header declares {BOMB_BYTES} bytes" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr) < 500
    assert list(out.iterdir()) == []


def test_header_bomb_in_control_archive(tmp_path, zeros_frame):
    data = tmp_path / "data.tar.xz"
    subprocess.run(["tar", "-cJf", str(data), "--files-from", "/dev/null"], check=True)
    bomb = _zstd_bomb(tmp_path, _header(tarfile.GNUTYPE_LONGNAME, BOMB_BYTES), zeros_frame,
                      "control.tar.zst")
    (tmp_path / "debian-binary").write_text("2.0\n")
    deb = tmp_path / "c.deb"
    subprocess.run(["ar", "rc", str(deb), "debian-binary", bomb.name, data.name], check=True,
                   cwd=tmp_path)
    r = run_limited(EXTRACT, mem_mib=384, cpu_s=30, args=[deb, tmp_path, "control"])
    assert r.returncode == 1 and "GNU long-name header declares" in r.stderr, r.stderr[-2000:]


def test_member_count_is_capped(tmp_path, monkeypatch):
    """tarfile keeps every TarInfo in stream mode; the reader drops them as it goes and caps
    the count (MAX_MEMBERS), so millions of tiny headers cannot pile up."""
    from builder.inputs.debian import deb as debmod
    from builder.errors import ArmvmError
    from tests.debrepo import make_deb
    monkeypatch.setattr(debmod, "MAX_MEMBERS", 5)
    make_deb(tmp_path / "m.deb", {"Package": "m"},
             [("./", "dir", None, 0o755)] + [(f"./f{i}", "file", b"x", 0o644) for i in range(9)])
    (tmp_path / "out").mkdir()
    with pytest.raises(ArmvmError, match="more than 5 members"):
        debmod.extract_deb(tmp_path / "m.deb", tmp_path / "out")


def test_overlong_name_and_xz_memlimit(tmp_path):
    """A 64 KiB member name (inside the header cap) is refused by the name cap; an xz
    stream asking for a 1.5 GiB dictionary is refused by the decoder's memory limit."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("./" + "a" * 65536)
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "data.tar").write_bytes(buf.getvalue())
    subprocess.run(["xz", "-q", str(tmp_path / "data.tar")], check=True)
    deb = _real_deb(tmp_path, tmp_path / "data.tar.xz")
    out = tmp_path / "out"
    out.mkdir()
    r = run_limited(EXTRACT, mem_mib=384, args=[deb, out, "data"])
    assert r.returncode == 1 and "longer than 4096 bytes" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr) < 500

    big = tmp_path / "big"
    big.mkdir()
    (big / "data.tar").write_bytes(buf.getvalue())
    # xz -9e uses a 64 MiB dictionary; --lzma2=dict=1536MiB declares 1.5 GiB
    subprocess.run(["xz", "-q", "--lzma2=preset=0,dict=1536MiB", "-T1", "--memlimit-compress=0",
                    str(big / "data.tar")], check=True)
    deb = _real_deb(big, big / "data.tar.xz")
    (big / "out").mkdir()
    r = run_limited(EXTRACT, mem_mib=384, args=[deb, big / "out", "data"])
    assert r.returncode == 1 and "corrupt data archive" in r.stderr and \
        "Memory usage limit" in r.stderr, r.stderr[-2000:]


FUZZ = """
import io, os, shutil, sys, tempfile, tarfile
from hypothesis import given, settings, HealthCheck, strategies as st
sys.path.insert(0, sys.argv[1])
from tests.debrepo import _tar, ar_archive, compress
from builder.inputs.debian.deb import extract_deb, read_control
from builder.errors import ArmvmError

BASE = _tar([("./", "dir", None, 0o755), ("./usr/", "dir", None, 0o755),
             ("./usr/" + "n" * 150, "file", b"x" * 3000, 0o644),
             ("./usr/l", "symlink", "n", 0o777), ("./usr/h", "hardlink", "./usr/" + "n" * 150, 0o644)])
TYPES = b"0123456KLSxgV\\0"
work = tempfile.mkdtemp()

@st.composite
def tar_bytes(draw):
    data = bytearray(BASE)
    for _ in range(draw(st.integers(0, 6))):                 # overwrite a few bytes
        at = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        data[at:at + len(chunk)] = chunk
    if draw(st.booleans()):                                  # a forged header in front
        info = tarfile.TarInfo(draw(st.text(min_size=1, max_size=40)))
        info.type = bytes([draw(st.sampled_from(TYPES))])
        info.size = draw(st.one_of(st.integers(0, 4096), st.integers(0, 8 ** 11 - 1)))
        try:
            head = info.tobuf(tarfile.GNU_FORMAT, errors="surrogateescape")
        except (ValueError, UnicodeError):
            head = b""
        data[0:0] = head + draw(st.binary(max_size=600))
    return bytes(data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)

@settings(max_examples=int(sys.argv[2]), deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(tar_bytes(), st.sampled_from(["", ".gz", ".xz", ".zst", ".bz2"]), st.booleans())
def fuzz(tar, comp, control):
    deb = os.path.join(work, "f.deb")
    ctl = _tar([("./", "dir", None, 0o755), ("./control", "file", "Package: f\\n", 0o644)])
    members = [("debian-binary", b"2.0\\n"),
               ("control.tar" + (comp if control else ""), compress(tar if control else ctl, comp if control else "")),
               ("data.tar" + comp, compress(tar, comp))]
    with open(deb, "wb") as f:
        f.write(ar_archive(members))
    dest = os.path.join(work, "out")
    shutil.rmtree(dest, ignore_errors=True)
    os.mkdir(dest)
    try:
        read_control(deb) if control else extract_deb(deb, dest)
    except ArmvmError as e:
        assert len(str(e)) < 1000, str(e)[:300]

fuzz()
print("fuzz ok")
"""


def test_fuzz_deb_reader_bounded_memory(tmp_path):
    """Random damage and forged headers: only ArmvmError (short), never another exception,
    within 640 MiB of address space (RLIMIT_AS), 300 examples."""
    from tests.limits import ROOT
    r = run_limited(FUZZ, mem_mib=640, cpu_s=300, args=[ROOT, 300])
    assert r.returncode == 0 and "fuzz ok" in r.stdout, (r.stdout + r.stderr)[-4000:]


def test_lock_and_vendor_folder_deliver_the_bomb_cli(tmp_path, zeros_frame):
    """The issue's delivery path: a recipe, a lock pinning the bomb's sha256 and a
    --vendor folder holding it; `armvm-build --offline` refuses it cleanly, in bounded
    memory, and publishes nothing."""
    import hashlib
    import json as _json
    from builder.inputs.lock import Lock, LockedPackage, write_lock
    from tests.fixtures import efi_recipe
    work = tmp_path / "bomb"
    work.mkdir()
    deb = _real_deb(work, _zstd_bomb(work, _header(tarfile.GNUTYPE_LONGNAME, BOMB_BYTES),
                                     zeros_frame))
    recipe = efi_recipe(tmp_path, extra_files="        - {package: busybox-static, path: "
                                              "usr/bin/busybox, dest: busybox}\n")
    recipe.write_text(recipe.read_text().replace("arch: aarch64\n",
                                                 "arch: aarch64\ndebian: {suite: trixie}\n"))
    filename = "pool/main/b/busybox/busybox-static_1.37.0-6_arm64.deb"
    blob = deb.read_bytes()
    write_lock(recipe.with_suffix(".lock"), Lock(
        source_date_epoch=1_700_000_000, mirror="http://mirror.invalid/debian",
        snapshot_mirror=None, suite="trixie", packages={"busybox-static": LockedPackage(
            "busybox-static", "1:1.37.0-6", filename, hashlib.sha256(blob).hexdigest(),
            len(blob), "arm64", "")}))
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / Path(filename).name).write_bytes(blob)
    out = tmp_path / "out"
    r = run_limited("""
import sys
from builder.cli import main
sys.argv = ["armvm-build", "build", "--offline", "--json", "--vendor", sys.argv[1],
            sys.argv[2], "-o", sys.argv[3]]
main()
""", mem_mib=512, cpu_s=60, args=[vendor, recipe, out],
        env=dict(__import__("os").environ, ARMVM_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    result = _json.loads(r.stdout)
    assert "GNU long-name header declares 1610612736 bytes" in result["error"]
    assert len(r.stdout) + len(r.stderr) < 2000
    assert list(out.iterdir()) == []                                 # not even a temp file
    assert not list((tmp_path / "cache").glob("trees-v2/*"))          # cache not poisoned
