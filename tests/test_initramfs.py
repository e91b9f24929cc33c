from __future__ import annotations

import gzip
import lzma
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from builder import spec
from builder.payload.cpio import NewcArchive
from builder.errors import ArmvmError
from builder.payload.initramfs import (COMPRESSIONS, build_initramfs, find_busybox, render_init)
from builder.payload.kernel import inspect_kernel, resolve_drivers
from tests.kofixtures import fake_busybox, make_kernel_tree

A64 = spec.ARCHES["aarch64"]
VERSION = "6.12.0-test-arm64"
MTIME = 1700000000
ROOT = Path(__file__).resolve().parent.parent


def parse_newc(data: bytes) -> list[dict]:
    """Independent newc reader: checks magic, alignment and the trailer."""
    entries, off = [], 0
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
             "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    while True:
        assert off % 4 == 0 and data[off:off + 6] == b"070701", f"bad header at {off}"
        h = {n: int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_end = off + 110 + h["namesize"]
        assert data[name_end - 1] == 0
        h["name"] = data[off + 110:name_end - 1].decode()
        body = name_end + (-name_end % 4)
        assert data[name_end:body] == b"\0" * (body - name_end)
        h["data"] = data[body:body + h["filesize"]]
        off = body + h["filesize"] + (-(body + h["filesize"]) % 4)
        if h["name"] == "TRAILER!!!":
            assert off == len(data)
            return entries
        entries.append(h)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    tree = make_kernel_tree(tmp_path_factory.mktemp("k") / "pkg", version=VERSION)
    return inspect_kernel(tree, A64)


@pytest.fixture(scope="module")
def busybox(tmp_path_factory):
    return fake_busybox(tmp_path_factory.mktemp("bb") / "usr/bin/busybox")


def build(kernel, busybox, out, **kw):
    kw.setdefault("modules", resolve_drivers(kernel, ["virtio_net", "virtio_blk"]))
    kw.setdefault("compression", "none")
    return build_initramfs(out=out, kernel=kernel, busybox=busybox, mtime=MTIME, **kw)


def test_layout_and_newc_fields(kernel, busybox, tmp_path):
    info = build(kernel, busybox, tmp_path / "initrd", payload="echo hi\n")
    data = (tmp_path / "initrd").read_bytes()
    entries = parse_newc(data)
    assert info.size == len(data) == info.uncompressed_size and info.entries == len(entries)
    by = {e["name"]: e for e in entries}
    names = [e["name"] for e in entries]
    assert names == sorted(names, key=str.encode)
    assert [e["ino"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["uid"] == 0 and e["gid"] == 0 and e["mtime"] == MTIME for e in entries)
    assert all(e["devmajor"] == 0 and e["devminor"] == 0 for e in entries)
    console = by["dev/console"]
    assert console["mode"] == 0o20600 and (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    for d in ("dev", "proc", "sys", "tmp", "bin", "etc", "etc/armvm", "lib", "lib/modules"):
        assert stat.S_ISDIR(by[d]["mode"]), d
    assert by["tmp"]["mode"] == 0o41777
    assert by["bin/busybox"]["mode"] == 0o100755 and by["bin/busybox"]["data"] == busybox.read_bytes()
    for applet in ("sh", "mount", "insmod", "modprobe", "cat", "readlink", "basename", "grep",
                   "uname", "poweroff", "mkdir", "echo", "ls"):
        assert by[f"bin/{applet}"]["mode"] == 0o120777 and by[f"bin/{applet}"]["data"] == b"busybox"
    mroot = f"lib/modules/{VERSION}"
    load = ["failover", "net_failover", "virtio_blk", "virtio_net"]
    assert info.module_load_order == tuple(load)
    assert by["etc/armvm/modules.load"]["data"].decode().split() == load
    for m in kernel.modules.values():
        key = f"{mroot}/{m.path}"
        if m.name in load:
            assert by[key]["data"] == (kernel.modules_dir / m.path).read_bytes()   # .ko.xz as is
        else:
            assert key not in by
    assert by[f"{mroot}/modules.dep"]["data"].decode() == (
        "kernel/net/core/failover.ko.xz:\n"
        "kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n"
        "kernel/drivers/block/virtio_blk.ko.xz:\n"
        "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz "
        "kernel/net/core/failover.ko.xz\n")
    assert by[f"{mroot}/modules.order"]["data"].decode().split() == [
        "kernel/drivers/block/virtio_blk.ko", "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko", "kernel/net/core/failover.ko"]
    for listing in ("modules.builtin", "modules.builtin.modinfo"):
        assert by[f"{mroot}/{listing}"]["data"] == (kernel.modules_dir / listing).read_bytes()
    assert by[f"{mroot}/config"]["data"] == kernel.config_path.read_bytes()
    assert by["etc/armvm/payload"]["data"] == b"echo hi\n"
    init = by["init"]
    assert init["mode"] == 0o100755
    text = init["data"].decode()
    insmods = [line.split()[1] for line in text.splitlines() if line.startswith("insmod ")]
    assert insmods == [f"/{mroot}/{kernel.modules[n].path}" for n in load]
    assert "/bin/sh /etc/armvm/payload" in text
    assert "P=ARMVM-REPORT" in text and "echo ARMVM-BOOT-COMPLETE" in text
    assert "mount -t devtmpfs devtmpfs /dev" in text and "poweroff -f" in text
    assert "sleep" not in text


def test_init_is_valid_posix_sh(kernel, busybox, tmp_path):
    for payload, root_fstype in ((None, None), ("true", None), (None, "ext4")):
        build(kernel, busybox, tmp_path / "i", payload=payload, root_fstype=root_fstype)
        init = {e["name"]: e for e in parse_newc((tmp_path / "i").read_bytes())}["init"]["data"]
        (tmp_path / "init.sh").write_bytes(init)
        run = subprocess.run(["sh", "-n", str(tmp_path / "init.sh")], capture_output=True)
        assert run.returncode == 0, run.stderr
        assert (b"/etc/armvm/payload" in init) == (payload is not None)


def test_gnu_cpio_reads_it(kernel, busybox, tmp_path):
    if shutil.which("cpio") is None:
        pytest.fail("GNU cpio is needed (apt-get install cpio)")
    build(kernel, busybox, tmp_path / "initrd")
    archive = (tmp_path / "initrd").read_bytes()
    listing = subprocess.run(["cpio", "-tv", "--quiet"], input=archive, capture_output=True,
                             check=True).stdout.decode()
    console = next(line for line in listing.splitlines() if line.endswith(" dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    names = [line.split()[-1] if " -> " not in line else line.split()[-3]
             for line in listing.splitlines()]
    assert names == [e["name"] for e in parse_newc(archive)]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-idv", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=out, capture_output=True, check=True)
    assert (out / "bin/busybox").read_bytes() == busybox.read_bytes()
    assert os.readlink(out / "bin/sh") == "busybox"
    assert (out / "init").read_bytes().startswith(b"#!/bin/sh")
    assert (out / f"lib/modules/{VERSION}/kernel/net/core/failover.ko.xz").read_bytes() == \
        (kernel.modules_dir / "kernel/net/core/failover.ko.xz").read_bytes()


@pytest.mark.parametrize("compression,tool", [("gzip", "gzip"), ("zstd", "zstd"), ("xz", "xz")])
def test_compressions_pass_external_tools(kernel, busybox, tmp_path, compression, tool):
    if shutil.which(tool) is None:
        pytest.fail(f"'{tool}' is needed for this test")
    info = build(kernel, busybox, tmp_path / "initrd", compression=compression)
    subprocess.run([tool, "-t", str(tmp_path / "initrd")], check=True, capture_output=True)
    raw = subprocess.run([tool, "-dc", str(tmp_path / "initrd")], check=True,
                         capture_output=True).stdout
    build(kernel, busybox, tmp_path / "plain", compression="none")
    assert raw == (tmp_path / "plain").read_bytes() and info.uncompressed_size == len(raw)
    head = (tmp_path / "initrd").read_bytes()[:16]
    if compression == "gzip":
        assert head[:3] == b"\x1f\x8b\x08" and head[3] == 0          # no FNAME etc.
        assert head[4:8] == b"\0\0\0\0"                              # MTIME 0
    if compression == "xz":
        assert head[:6] == b"\xfd7zXZ\x00" and head[6:8] == b"\x00\x01"  # check = CRC32


def test_unknown_compression_lists_allowed(kernel, busybox, tmp_path):
    with pytest.raises(ArmvmError, match="'lz4' is not supported.*gzip, zstd, xz, none"):
        build(kernel, busybox, tmp_path / "i", compression="lz4")
    assert COMPRESSIONS == ("gzip", "zstd", "xz", "none")


def test_compression_the_kernel_cannot_unpack(tmp_path, busybox):
    tree = make_kernel_tree(tmp_path / "k", config={"CONFIG_RD_GZIP": "y"})
    k = inspect_kernel(tree, A64)
    with pytest.raises(ArmvmError, match="CONFIG_RD_ZSTD is not =y"):
        build(k, busybox, tmp_path / "i", compression="zstd", modules=[])


def test_byte_identical_and_host_independent(kernel, busybox, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "tool.sh").write_text("echo tool\n")
    os.chmod(extra / "tool.sh", 0o700)
    (extra / "data.txt").write_text("data\n")
    os.chmod(extra / "data.txt", 0o600)
    a = build(kernel, busybox, tmp_path / "a", compression="gzip", extra_files=[("opt", extra)])
    b = build(kernel, busybox, tmp_path / "b", compression="gzip", extra_files=[("opt", extra)])
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() and a.sha256 == b.sha256
    # the same build in another process: other umask, time zone, locale; extra files recreated
    # with other permission bits (only the owner's execute bit may matter)
    os.chmod(extra / "tool.sh", 0o755)
    os.chmod(extra / "data.txt", 0o644)
    script = (
        "import os, sys; os.umask(0o077); sys.path[:0] = [sys.argv[1]]\n"
        "from pathlib import Path\n"
        "from builder.payload.kernel import inspect_kernel, resolve_drivers\n"
        "from builder.payload.initramfs import build_initramfs\n"
        "from builder import spec\n"
        "k = inspect_kernel(Path(sys.argv[2]), spec.ARCHES['aarch64'])\n"
        "build_initramfs(out=Path(sys.argv[3]), kernel=k, busybox=Path(sys.argv[4]),\n"
        "    modules=resolve_drivers(k, ['virtio_net', 'virtio_blk']), compression='gzip',\n"
        f"    mtime={MTIME}, extra_files=[('opt', Path(sys.argv[5]))])\n")
    env = dict(os.environ, TZ="Asia/Kolkata", LC_ALL="C", LANG="C")
    tree = kernel.image.parent.parent
    subprocess.run([sys.executable, "-c", script, str(ROOT), str(tree), str(tmp_path / "c"),
                    str(busybox), str(extra)], env=env, check=True)
    assert (tmp_path / "c").read_bytes() == (tmp_path / "a").read_bytes()
    by = {e["name"]: e for e in parse_newc(gzip.decompress((tmp_path / "a").read_bytes()))}
    assert by["opt/tool.sh"]["mode"] == 0o100755 and by["opt/data.txt"]["mode"] == 0o100644
    # a different SOURCE_DATE_EPOCH changes the bytes (timestamps are really used)
    other = build_initramfs(out=tmp_path / "d", kernel=kernel, busybox=busybox, mtime=MTIME + 2,
                            modules=resolve_drivers(kernel, ["virtio_net", "virtio_blk"]),
                            compression="gzip", extra_files=[("opt", extra)])
    assert other.sha256 != a.sha256


def test_decompressed_modules(kernel, busybox, tmp_path):
    build(kernel, busybox, tmp_path / "i", decompress_modules=True)
    by = {e["name"]: e for e in parse_newc((tmp_path / "i").read_bytes())}
    mroot = f"lib/modules/{VERSION}"
    ko = by[f"{mroot}/kernel/drivers/net/virtio_net.ko"]["data"]
    assert ko == lzma.decompress((kernel.modules_dir / "kernel/drivers/net/virtio_net.ko.xz")
                                 .read_bytes())
    assert f"{mroot}/kernel/drivers/net/virtio_net.ko.xz" not in by
    assert "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko" in \
        by[f"{mroot}/modules.dep"]["data"].decode()
    assert f"insmod /{mroot}/kernel/drivers/net/virtio_net.ko ||" in by["init"]["data"].decode()


def test_module_list_must_be_dependency_ordered(kernel, busybox, tmp_path):
    mods = resolve_drivers(kernel, ["virtio_net"])
    with pytest.raises(ArmvmError, match="'virtio_net' needs 'net_failover'"):
        build(kernel, busybox, tmp_path / "i", modules=[mods[2], mods[1], mods[0]])


def test_extra_files_and_conflicts(kernel, busybox, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    info = build(kernel, busybox, tmp_path / "i", extra_files=[("/usr/share/f.txt", f)])
    by = {e["name"]: e for e in parse_newc((tmp_path / "i").read_bytes())}
    assert by["usr/share/f.txt"]["data"] == b"x" and stat.S_ISDIR(by["usr/share"]["mode"])
    assert info.entries == len(by)
    with pytest.raises(ArmvmError, match="/bin/busybox is added twice"):
        build(kernel, busybox, tmp_path / "i", extra_files=[("bin/busybox", f)])
    with pytest.raises(ArmvmError, match="must stay inside the archive"):
        build(kernel, busybox, tmp_path / "i", extra_files=[("../etc/passwd", f)])
    with pytest.raises(ArmvmError, match="not a regular file"):
        build(kernel, busybox, tmp_path / "i", extra_files=[("x", tmp_path / "missing")])


def test_custom_template_and_sandbox(kernel, busybox, tmp_path):
    tpl = ("#!/bin/sh\n# {{ kernel_version }} {{ report_prefix }} {{ boot_marker }}\n"
           "{% for m in modules %}{{ m }}\n{% endfor %}{{ payload }}\n")
    build(kernel, busybox, tmp_path / "i", init_template=tpl, payload="run-me")
    init = {e["name"]: e for e in parse_newc((tmp_path / "i").read_bytes())}["init"]["data"]
    assert init.decode().splitlines() == [
        "#!/bin/sh", f"# {VERSION} ARMVM-REPORT ARMVM-BOOT-COMPLETE",
        f"/lib/modules/{VERSION}/kernel/net/core/failover.ko.xz",
        f"/lib/modules/{VERSION}/kernel/drivers/net/net_failover.ko.xz",
        f"/lib/modules/{VERSION}/kernel/drivers/block/virtio_blk.ko.xz",
        f"/lib/modules/{VERSION}/kernel/drivers/net/virtio_net.ko.xz", "run-me"]
    with pytest.raises(ArmvmError, match="UndefinedError.*nope"):
        render_init("#!/bin/sh\n{{ nope }}", {})
    with pytest.raises(ArmvmError, match="SecurityError"):
        render_init("#!/bin/sh\n{{ cycler.__init__.__globals__ }}", {})
    with pytest.raises(ArmvmError, match="exceeds"):
        render_init("#!/bin/sh\n{{ 'a' * 100000000 }}", {})
    with pytest.raises(ArmvmError, match="more than"):
        render_init("#!/bin/sh\n{% for i in range(9000) %}{{ 'b' * 1000 }}{% endfor %}", {})
    with pytest.raises(ArmvmError, match="starting with '#!'"):
        render_init("echo no shebang", {})


def test_find_busybox(tmp_path):
    trixie = fake_busybox(tmp_path / "t/usr/bin/busybox")
    bookworm = fake_busybox(tmp_path / "b/bin/busybox")
    assert find_busybox(tmp_path / "t", A64) == trixie
    assert find_busybox(tmp_path / "b") == bookworm
    with pytest.raises(ArmvmError, match="no busybox in .*busybox-static"):
        find_busybox(tmp_path / "nothing")
    fake_busybox(tmp_path / "d/usr/bin/busybox", dynamic=True)
    with pytest.raises(ArmvmError, match="dynamically linked.*busybox-static"):
        find_busybox(tmp_path / "d")
    with pytest.raises(ArmvmError, match="not armv7"):
        find_busybox(tmp_path / "t", spec.ARCHES["armv7"])


def test_newc_writer_rules():
    arc = NewcArchive(0)
    arc.add_file("a/b/c", b"xyz")
    arc.add_symlink("a/l", "b/c")
    arc.add_dir("a/b")                    # already implied: fine
    with pytest.raises(ArmvmError, match="added twice"):
        arc.add_file("a/b/c", b"other")
    with pytest.raises(ArmvmError, match="both a file and a directory"):
        arc.add_dir("a/b/c")
    with pytest.raises(ArmvmError, match="out of range"):
        NewcArchive(-1)
    entries = parse_newc(arc.to_bytes())
    assert [(e["name"], e["nlink"]) for e in entries] == [("a", 2), ("a/b", 2), ("a/b/c", 1),
                                                          ("a/l", 1)]
    assert entries[2]["data"] == b"xyz" and entries[3]["data"] == b"b/c"


# --- cold-plug by modalias ---------------------------------------------------------------------

def _coldplug_script(text: str, sysroot: Path, log: Path) -> str:
    """The rendered /init's module section, run against a fake /sys with insmod logged; an
    insmod of virtio_mmio adds a virtio-net device (as a transport does)."""
    start = text.index("loaded=0 new=0")
    end = text.index('echo "armvm-init: loaded')
    body = text[start:end + text[end:].index("\n")].replace("/sys/", f"{sysroot}/")
    body = body.replace("/tmp/.modalias", f"{sysroot}.modalias")
    net = sysroot / "bus/virtio/devices/virtio0"
    return (f'insmod() {{ echo "${{1##*/}}" >> {log}; case "$1" in *virtio_mmio*) '
            f'mkdir -p {net} && echo virtio:d00000001v00001AF4 > {net}/modalias ;; esac; }}\n'
            + body + "\n")


@pytest.mark.parametrize("devices,expected", [
    # virt without Xen: the transport, then (second pass) virtio-net with its dependencies
    ({"platform/devices/a000000.virtio_mmio": "of:NvirtioT(null)Cvirtio,mmio"},
     ["virtio_mmio.ko", "failover.ko", "net_failover.ko", "virtio_net.ko"]),
    # Xen: only the block front-end
    ({"xen/devices/vbd-51712": "xen:vbd"}, ["xen-blkfront.ko"]),
    # nothing matches: nothing loads, and nothing fails
    ({"platform/devices/9000000.pl011": "of:NplT(null)Carm,pl011"}, []),
    # a class device (input devices sit on no bus) is seen too
    ({"../class/xen-ish/vbd0": "xen:vbd"}, ["xen-blkfront.ko"]),
])
def test_init_loads_only_modules_whose_alias_matches_a_device(kernel, busybox, tmp_path, devices,
                                                                expected):
    mods = resolve_drivers(kernel, ["virtio_mmio", "virtio_net", "virtio_blk", "xen_blkfront"])
    build(kernel, busybox, tmp_path / "i", modules=mods)
    by = {e["name"]: e for e in parse_newc((tmp_path / "i").read_bytes())}
    text = by["init"]["data"].decode()
    sysroot, log = tmp_path / "sys", tmp_path / "insmod.log"
    for where, alias in devices.items():
        (sysroot / "bus" / where).mkdir(parents=True)
        (sysroot / "bus" / where / "modalias").write_text(alias + "\n")
    script = tmp_path / "coldplug.sh"
    script.write_text(_coldplug_script(text, sysroot, log))
    run = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = log.read_text().split() if log.exists() else []
    assert [name.split(".ko")[0] + ".ko" for name in loaded] == expected
    assert f"loaded {len(expected)} of {len(mods)} module(s)" in run.stdout
    # every module is still in the initramfs and in modules.load (the image still boots on Xen)
    load_list = by[spec.INITRD_LOAD_LIST]["data"].decode().split()
    assert load_list == [m.name for m in mods]
    assert all(any(e.endswith(m.path) for e in by) for m in mods)


@pytest.mark.parametrize("drivers,expected", [
    (["net_failover"], ["failover", "net_failover"]),     # asked for, drives no device: loads
    (["net_failover", "virtio_net"], []),                 # now only virtio_net's dependency
])
def test_init_always_loads_modules_that_drive_no_device(kernel, busybox, tmp_path, drivers,
                                                        expected):
    """A module without device aliases that nothing else in the list depends on (a file
    system, crc32c for ext4) loads at once; a library only with a module that needs it."""
    build(kernel, busybox, tmp_path / "i", modules=resolve_drivers(kernel, drivers))
    text = {e["name"]: e for e in parse_newc((tmp_path / "i").read_bytes())}["init"]["data"].decode()
    log = tmp_path / "insmod.log"
    script = tmp_path / "coldplug.sh"
    script.write_text(_coldplug_script(text, tmp_path / "nosys", log))
    run = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = log.read_text().split() if log.exists() else []
    assert [n.split(".ko")[0] for n in loaded] == expected


@pytest.mark.parametrize("alias,value,match", [
    ("virtio:d00000002v*", "virtio:d00000002v00001AF4", True),
    ("virtio:d00000002v*", "virtio:d00000012v00001AF4", False),
    ("of:N*T*Cvirtio,mmio", "of:NvirtioT(null)Cvirtio,mmio", True),
    ("of:N*T*Cvirtio,mmio", "of:NvirtioT(null)Cvirtio,mmioCfoo", False),
    ("acpi*:LNRO0005:*", "acpi:LNRO0005:", True),
    ("dmi*:rvn[Vv]endor*", "dmi:rvnvendor", True),
    ("pci:v[!0]*", "pci:v0001", False),
    ("a.b", "axb", False),
    ("x(y)+", "x(y)+", True),
])
def test_alias_regex_matches_like_fnmatch(alias, value, match):
    """The ERE /init greps with agrees with fnmatch (modprobe's rules), judged by grep."""
    import fnmatch
    from builder.payload.initramfs import alias_regex
    assert fnmatch.fnmatchcase(value, alias) == match
    run = subprocess.run(["grep", "-q", "-x", "-E", "-e", alias_regex(alias)], input=value + "\n",
                         text=True)
    assert (run.returncode == 0) == match
