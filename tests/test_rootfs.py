"""Root file systems without the network: tarball checks (bad input refused before anything
is written), the hygiene, the recipe rules, the /init handover block, and an unprivileged
build of a root from a tarball under fakeroot, judged by e2fsck -fn and debugfs stat."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import uuid
from pathlib import Path

import pytest

from builder.errors import ArmvmError, RecipeError
from builder.payload.rootfs import hygiene
from builder.payload.rootfs.tarball import check_tar

ROOT = Path(__file__).resolve().parent.parent
TS = 1700000000
MIB = 1 << 20


def make_tar(path: Path, members) -> Path:
    """members: (name, type, extra dict) with type file/dir/sym/lnk/chr."""
    with tarfile.open(path, "w") as tf:
        for name, kind, extra in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = TS
            ti.mode = extra.get("mode", 0o755 if kind == "dir" else 0o644)
            ti.uid, ti.gid = extra.get("uid", 0), extra.get("gid", 0)
            data = None
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, extra["to"]
            elif kind == "lnk":
                ti.type, ti.linkname = tarfile.LNKTYPE, extra["to"]
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, *extra["dev"]
            else:
                data = extra.get("data", b"x")
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def minimal_root(path: Path) -> Path:
    """A tiny root tarball with what the hygiene and the checks need."""
    return make_tar(path, [
        ("./", "dir", {}), ("./etc", "dir", {}), ("./usr", "dir", {}), ("./usr/sbin", "dir", {}),
        ("./usr/lib", "dir", {}), ("./usr/bin", "dir", {}), ("./dev", "dir", {}),
        ("./sbin", "sym", {"to": "usr/sbin"}), ("./lib", "sym", {"to": "usr/lib"}),
        ("./usr/sbin/init", "file", {"mode": 0o755, "data": b"#!/bin/sh\n"}),
        ("./usr/bin/passwd", "file", {"mode": 0o4755, "data": b"\x7fELF" + bytes(100)}),
        ("./usr/bin/passwd-hard", "lnk", {"to": "./usr/bin/passwd", "mode": 0o4755}),
        ("./etc/shadow", "file", {"mode": 0o640, "gid": 42, "data": b"root:*:19000:0:99999:7:::\n"}),
        ("./etc/shadow-", "file", {"mode": 0o000, "data": b"root:*:19000:0:99999:7:::\n"}),
        ("./etc/hostname", "file", {"data": b"buildhost\n"}),
        ("./etc/resolv.conf", "sym", {"to": "/run/systemd/resolve/stub-resolv.conf"}),
        ("./dev/null", "chr", {"mode": 0o666, "dev": (1, 3)}),
        ("./home", "dir", {}), ("./home/u", "dir", {"uid": 1000, "gid": 1000, "mode": 0o700}),
    ])


# --- tarball checks --------------------------------------------------------------------------

@pytest.mark.parametrize("members,words", [
    ([("../evil", "file", {})], "'..'"),
    ([("/etc/passwd", "file", {})], "absolute"),
    ([("./a", "sym", {"to": "/etc"}), ("./a/passwd", "file", {})], "below the symlink"),
    ([("./x", "lnk", {"to": "/etc/shadow"})], "hard link"),
])
def test_bad_tarball_members_are_refused_before_anything_is_written(tmp_path, members, words):
    tar = make_tar(tmp_path / "bad.tar", members)
    with pytest.raises(ArmvmError) as err:
        check_tar(tar, can_mknod=True)
    assert words in str(err.value) and "bad.tar" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.tar"]


def test_device_nodes_refused_when_they_cannot_be_created(tmp_path):
    tar = make_tar(tmp_path / "dev.tar", [("./dev/null", "chr", {"dev": (1, 3)})])
    with pytest.raises(ArmvmError, match="fakeroot"):
        check_tar(tar, can_mknod=False)
    assert check_tar(tar, can_mknod=True).devices == 1


def test_zstd_tarball_is_read(tmp_path):
    import zstandard
    plain = minimal_root(tmp_path / "r.tar")
    (tmp_path / "r.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    assert check_tar(tmp_path / "r.tar.zst", can_mknod=True).members == check_tar(plain, can_mknod=True).members


def test_not_a_tarball(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"hello" * 100)
    with pytest.raises(ArmvmError, match="not a tar archive|damaged"):
        check_tar(tmp_path / "x.tar", can_mknod=True)


# --- hygiene ---------------------------------------------------------------------------------

def test_paths_resolve_inside_the_root_never_outside(tmp_path):
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    os.symlink("/../../../../etc", root / "escape")
    os.symlink("../../..", root / "usr/up")
    assert hygiene.resolve_in(root, "lib/modules") == root / "usr/lib/modules"
    assert hygiene.resolve_in(root, "escape/passwd") == root / "etc/passwd"
    assert hygiene.resolve_in(root, "usr/up/x") == root / "x"


def test_hygiene_replaces_host_files_and_writes_fstab(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("keep")
    os.symlink(str(outside), root / "etc/resolv.conf")          # must not be followed
    (root / "etc/hostname").write_text("buildhost\n")
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd/system/systemd-networkd.service").write_text(
        "[Unit]\nDescription=n\n[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nbin:*:1::::::\n")
    (root / "etc/ssh").mkdir()
    (root / "etc/ssh/sshd_config").write_text("")
    (root / "usr/lib/systemd/system/sshd-keygen.service").write_text("[Unit]\n")
    (root / "var").mkdir()
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret of the build host")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("pub")
    key = tmp_path / "key.pub"
    key.write_text("ssh-ed25519 AAAA test\n")
    hygiene.apply(root, hostname="vm1", fs_uuid="11111111-2222-3333-4444-555555555555", fstype="ext4",
                  mtime=TS, password_hash="$y$j9T$salt$hash", dhcp=True, enable=[],
                  files=[(str(key), "root/.ssh/authorized_keys", 0o600)])
    assert outside.read_text() == "keep"
    assert (root / "etc/resolv.conf").read_bytes() == b"" and not (root / "etc/resolv.conf").is_symlink()
    assert (root / "etc/hostname").read_text() == "vm1\n"
    mid = root / "etc/machine-id"
    assert mid.read_bytes() == b"" and stat.S_IMODE(mid.stat().st_mode) == 0o444
    fstab = (root / "etc/fstab").read_text()
    assert "UUID=11111111-2222-3333-4444-555555555555\t/\text4" in fstab and "/dev/" not in fstab
    assert (root / "etc/shadow").read_text().splitlines()[0].startswith("root:$y$j9T$salt$hash:19000")
    link = root / "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/systemd-networkd.service"
    assert "DHCP=yes" in (root / "etc/systemd/network/20-armvm-dhcp.network").read_text()
    ak = root / "root/.ssh/authorized_keys"
    assert ak.read_text() == "ssh-ed25519 AAAA test\n" and stat.S_IMODE(ak.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "root/.ssh").stat().st_mode) == 0o700
    assert (root / "etc/hostname").stat().st_mtime == TS
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    assert os.path.islink(root / "etc/systemd/system/ssh.service.wants/armvm-ssh-keygen.service")
    for stamp in ("etc/.updated", "var/.updated"):
        assert f"TIMESTAMP_NSEC={TS}000000000" in (root / stamp).read_text()


def test_enabling_a_missing_unit_names_it(tmp_path):
    (tmp_path / "etc").mkdir()
    with pytest.raises(ArmvmError, match="systemd-networkd.service.*not in the root"):
        hygiene.enable_unit(tmp_path, "systemd-networkd.service", mtime=TS)



def test_a_unit_the_recipe_ships_can_be_enabled(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    unit = tmp_path / "probe.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    hygiene.apply(root, hostname="vm", fs_uuid=str(uuid.UUID(int=1)), fstype="ext4", mtime=TS,
                  password_hash=None, dhcp=False, enable=["probe.service"],
                  files=[(unit, "etc/systemd/system/probe.service", 0o644)])
    link = root / "etc/systemd/system/multi-user.target.wants/probe.service"
    assert os.readlink(link) == "/etc/systemd/system/probe.service"

# --- recipes ---------------------------------------------------------------------------------

BASE = """
name: srv
arch: aarch64
debian: {suite: trixie}
kernel: {package: linux-image-cloud-arm64}
initramfs: {}
bootloader: {type: grub}
"""


def recipe(tmp_path, text):
    from builder.recipe.load import load_recipe
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(BASE) + textwrap.dedent(text))
    return load_recipe(p)


def test_rootfs_recipe_loads(tmp_path):
    (tmp_path / "root.tar").write_bytes(b"")
    r = recipe(tmp_path, """
        rootfs: {tar: root.tar, hostname: vm, network: dhcp}
        disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: ext4}]}
    """)
    assert r.rootfs.kind == "tar" and r.rootfs.path == (tmp_path / "root.tar").resolve()
    assert r.disk.partitions[1].format == "ext4" and r.disk.partitions[1].size is None


@pytest.mark.parametrize("text,words", [
    ("""rootfs: {tar: a.tar, dir: b}
disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: ext4}]}""", "exactly one of debian, tar, dir"),
    ("""rootfs: {tar: a.tar}
disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}]}""", "partition of type root"),
    ("""disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: ext4}]}""", "needs a rootfs"),
    ("""rootfs: {tar: a.tar}
disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB, format: ext4}]}""", "only for the partition of type root"),
    ("""rootfs: {tar: a.tar}
disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: btrfs}]}""", "ext4"),
    ("""rootfs: {tar: ../a.tar}
disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: ext4}]}""", "leaves the recipe"),
    ("""rootfs: {tar: a.tar, files: [{file: k, dest: /root/x}]}
disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: ext4}]}""", "absolute"),
])
def test_bad_rootfs_recipes_are_refused(tmp_path, text, words):
    with pytest.raises(RecipeError) as err:
        recipe(tmp_path, text)
    assert words in str(err.value)


def test_cmdline_names_the_root_by_uuid_derived_from_the_seed(tmp_path):
    from builder.payload.components import Context, kernel_cmdline
    from builder.disk.layout import root_fs_ids
    r = recipe(tmp_path, """
        seed: fixed
        rootfs: {tar: a.tar}
        disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: ext4}]}
    """)
    ctx = Context(r, None, tmp_path, TS)
    ctx.root_uuid = str(root_fs_ids("fixed", 2)[0])
    line = kernel_cmdline(ctx)
    assert f"root=UUID={root_fs_ids('fixed', 2)[0]}" in line and "/dev/" not in line
    assert root_fs_ids("fixed", 2) == root_fs_ids("fixed", 2) != root_fs_ids("other", 2)


def test_layout_gives_the_root_the_dps_type_and_records_it(tmp_path):
    from builder import spec
    from builder.disk.layout import plan_layout
    r = recipe(tmp_path, """
        rootfs: {tar: a.tar}
        disk: {size: 1GiB, partitions: [{type: esp, size: 256MiB}, {type: root, format: ext4}]}
    """)
    layout = plan_layout(r, [], timestamp=TS, seed="s")
    root = layout.partitions[1]
    assert root.type_guid == spec.ARCHES["aarch64"].root_type_guid
    assert root.last_lba * 512 > 1000 * MIB
    j = layout.to_json()["partitions"][1]
    assert j["filesystem"] == "ext4" and uuid.UUID(j["fs_uuid"])


# --- /init -----------------------------------------------------------------------------------

def _render(root_fstype):
    from builder.payload.initramfs import DEFAULT_TEMPLATE, render_init
    from builder import spec
    return render_init(DEFAULT_TEMPLATE.read_text(), dict(
        modules=[], module_names=[], module_deps=[], module_aliases=[], module_boot=[],
        payload=None, payload_path="/p", kernel_version="6.1",
        report_prefix=spec.REPORT_PREFIX, boot_marker=spec.BOOT_MARKER, load_list="/l",
        root_fstype=root_fstype, root_timeout=30))


def test_init_hands_over_with_switch_root_only_with_a_rootfs():
    text = _render("ext4")
    assert "exec switch_root /newroot" in text and "findfs" in text
    assert 'mount -o move "/$m" "/newroot/$m"' in text
    assert "block devices" in text                       # what exists when the root never shows up
    subprocess.run(["sh", "-n"], input=text, text=True, check=True)
    probe = _render(None)
    assert "exec switch_root" not in probe and "findfs" not in probe and "ARMVM-REPORT" in probe


def test_init_finds_the_root_by_uuid_and_switches(tmp_path):
    """Run the handover block with stub applets: it asks findfs for the UUID, mounts what it
    returns and execs switch_root with /sbin/init."""
    text = _render("ext4")
    block = text[text.index("root= rootfstype="):text.index("exec switch_root")] + \
        'echo "SWITCH $init $dev $rootfstype $mode"\nfi\n'
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    for name, body in {"findfs": f'echo "findfs $*" >> {log}; echo /dev/vdb2',
                       "mount": f'echo "mount $*" >> {log}', "umount": "true", "poweroff": "exit 0",
                       "sleep": "true"}.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyAMA0 root=UUID=abcd-ef rootfstype=ext4 rw\n")
    newroot = tmp_path / "newroot"
    (newroot / "sbin").mkdir(parents=True)
    os.symlink("/lib/systemd/systemd", newroot / "sbin/init")
    script = block.replace("/proc/cmdline", str(cmdline)).replace("/newroot", str(newroot))
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                         env={"PATH": f"{bin_}:/usr/bin:/bin"}, timeout=30)
    assert f"SWITCH /sbin/init /dev/vdb2 ext4 rw" in out.stdout, out.stdout + out.stderr
    calls = log.read_text()
    assert "findfs UUID=abcd-ef" in calls and f"mount -t ext4 -o rw /dev/vdb2 {newroot}" in calls


def test_init_reports_a_missing_root_with_the_block_devices(tmp_path):
    text = _render("ext4")
    block = text[text.index("root= rootfstype="):text.index("    mkdir -p /newroot")] + "fi\n"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, body in {"findfs": "exit 1", "poweroff": "exit 0", "sleep": "true", "sync": "true"}.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    (tmp_path / "cmdline").write_text("root=UUID=dead-beef rootdelay=1\n")
    script = block.replace("/proc/cmdline", str(tmp_path / "cmdline")).replace("exec /bin/sh", "exit 7")
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                         env={"PATH": f"{bin_}:/usr/bin:/bin"}, timeout=30)
    assert "FATAL: root UUID=dead-beef did not appear within 1s" in out.stdout
    assert "block devices:" in out.stdout and out.returncode == 7


# --- an unprivileged build of a root from a tarball -------------------------------------------

@pytest.fixture
def shared_tmp():
    """A folder an unprivileged user can use (pytest's own tmp folders are root-only)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="armvm-rootfs-test-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _have(tool):
    return shutil.which(tool) is not None


def _judged_root(img):
    """e2fsck -fn passes on the ext4 file `img`, and what the unprivileged tests' tarball
    carries survived (setuid, hard link, group, mode 0000, device node, user 1000);
    returns debugfs `stat` for further looks."""
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout

    def st(path):
        return subprocess.run(["debugfs", "-R", f"stat {path}", str(img)], capture_output=True,
                              text=True).stdout
    passwd = st("/usr/bin/passwd")
    assert "Mode:  04755" in passwd and "User:     0" in passwd and "Links: 2" in passwd
    assert "Group:    42" in st("/etc/shadow") and "Mode:  0000" in st("/etc/shadow-")
    assert "character special" in st("/dev/null")
    assert "User:  1000   Group:  1000" in st("/home/u")
    return st


@pytest.mark.skipif(not (_have("fakeroot") and _have("setpriv") and os.geteuid() == 0
                         and os.access("/usr/bin/python3", os.X_OK)),
                    reason="needs root to drop to an unprivileged user, fakeroot and setpriv")
def test_unprivileged_root_from_a_tarball_keeps_owners_modes_and_devices(shared_tmp):
    tmp_path = shared_tmp
    tar = minimal_root(tmp_path / "root.tar")
    kmods = tmp_path / "kmods" / "6.1.0-test"
    (kmods / "kernel").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    for p in (tmp_path / "kmods", kmods, kmods / "kernel", work):
        p.chmod(0o777)
    tar.chmod(0o644)
    plan = {"source": {"kind": "tar", "path": str(tar)}, "staging": str(work / "staging"),
            "work": str(work), "timestamp": TS,
            "hygiene": {"hostname": "vm", "password_hash": None, "dhcp": False, "enable": [], "files": []},
            "modules": {"dir": str(kmods), "version": "6.1.0-test"},
            "ext4": {"target": str(work / "root.ext4"), "offset": 0, "size": 64 * MIB,
                     "uuid": str(uuid.UUID(int=3)), "hash_seed": str(uuid.UUID(int=4))},
            "result": str(work / "result.json")}
    code = ("import json,sys; from builder.payload.rootfs import _run_stage; "
            "r=_run_stage(json.load(open(sys.argv[1])), False); print(json.dumps(r))")
    (work / "plan.json").write_text(json.dumps(plan))
    # Debian's python3: the test runner's own interpreter may live where nobody can read, and
    # so may the checkout (CI and make fresh-check clone under /root): the unprivileged user
    # gets its own copy of the package.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "builder", src / "builder", ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, _ in os.walk(src):
        os.chmod(d, 0o755)
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                          "-c", code, str(work / "plan.json")], capture_output=True, text=True, cwd=src,
                         env=dict(os.environ, HOME=str(work), PYTHONPATH=str(src)), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    img = work / "root.ext4"
    assert os.stat(img).st_uid == 65534                         # really built unprivileged
    assert not (work / "staging").exists()
    st = _judged_root(img)
    assert "Mode:  0640" in st("/etc/shadow")
    assert "Mode:  0700" in st("/home/u")
    assert "Type: symlink" in st("/sbin")
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(img)], capture_output=True, text=True)
    assert cat.stdout == "vm\n"
    mid = st("/etc/machine-id")
    assert "Size: 0" in mid
    assert "modules.dep" in subprocess.run(["debugfs", "-R", "ls /usr/lib/modules/6.1.0-test", str(img)],
                                           capture_output=True, text=True).stdout



UNPRIV_RECIPE = """\
name: unpriv-tar
arch: aarch64
debian: {suite: trixie, components: [main]}
kernel: {package: linux-image-cloud-arm64, cmdline: "console=ttyAMA0"}
initramfs: {drivers: [virtio_pci, virtio_blk]}
bootloader: {type: uki}
rootfs:
  tar: root.tar
  hostname: vm
  files: [{file: key.pub, dest: root/.ssh/authorized_keys, mode: "0600"}]
disk:
  size: 128MiB
  partitions:
    - {type: esp, size: 48MiB}
    - {type: root, format: ext4}
"""


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("ARMVM_OFFLINE_TESTS") == "1", reason="ARMVM_OFFLINE_TESTS=1")
@pytest.mark.skipif(not (_have("fakeroot") and _have("setpriv") and os.geteuid() == 0
                         and os.access("/usr/bin/python3", os.X_OK)),
                    reason="needs root to drop to an unprivileged user, fakeroot and setpriv")
def test_unprivileged_cli_build_from_a_tarball(shared_tmp):
    """`armvm-build build` end to end as uid 65534 (no root, no subuid, no loop device): the
    CLI itself runs the root's staging and mke2fs in a fakeroot session, and the image's
    root keeps owners, modes, setuid bits, hard links and device nodes."""
    import jinja2
    d = shared_tmp
    minimal_root(d / "root.tar").chmod(0o644)
    (d / "key.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0 test\n")
    (d / "recipe.yaml").write_text(UNPRIV_RECIPE)
    # The dropped user may read neither the checkout nor this interpreter (CI and make
    # fresh-check live under /root): it gets copies of builder/ and of the dependencies, and
    # runs Debian's python3 (same minor version as the venv on this project's hosts).
    src = d / "src"
    shutil.copytree(ROOT / "builder", src / "builder", ignore=shutil.ignore_patterns("__pycache__"))
    site = Path(jinja2.__file__).resolve().parent.parent
    skip = shutil.ignore_patterns("__pycache__", "*.pth", "__editable__*", "pip", "_pytest", "pytest",
                                  "hypothesis", "setuptools", "pkg_resources", "_distutils_hack")
    shutil.copytree(site, src / "site", ignore=skip)
    for p in (d, src):
        for dirpath, _, _ in os.walk(p):
            os.chmod(dirpath, 0o777 if Path(dirpath) == d else 0o755)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(d / "home"), "LANG": "C.UTF-8",
           "PYTHONPATH": f"{src}:{src / 'site'}", "ARMVM_CACHE_DIR": str(d / "cache")}
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                          "-m", "builder", "build", "-q", "--json", str(d / "recipe.yaml"), "-o", str(d / "out")],
                         capture_output=True, text=True, cwd=d, env=env, timeout=1800)
    if "No module named" in out.stderr or "ImportError" in out.stderr:
        pytest.skip(f"Debian's python3 cannot load the venv's packages: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    img = d / "out" / "unpriv-tar.raw"
    assert os.stat(img).st_uid == 65534                         # really built unprivileged
    verify = json.loads((d / "out" / "unpriv-tar.verify.json").read_text())
    checks = {c["id"]: c["result"] for c in verify["checks"]}
    for cid in ("root.type", "root.fs", "root.found", "root.init"):
        assert checks.get(cid) == "pass", (cid, checks.get(cid))
    manifest = json.loads((d / "out" / "unpriv-tar.manifest.json").read_text())
    part = next(p for p in manifest["layout"]["partitions"] if p["kind"] == "root")
    root = d / "root.ext4"
    with open(img, "rb") as f, open(root, "wb") as g:
        f.seek(part["first_lba"] * 512)
        g.write(f.read((part["last_lba"] - part["first_lba"] + 1) * 512))
    st = _judged_root(root)
    key = st("/root/.ssh/authorized_keys")
    assert "Mode:  0600" in key and "User:     0" in key
    mods = subprocess.run(["debugfs", "-R", f"ls /usr/lib/modules/{part['kernel_version']}", str(root)],
                          capture_output=True, text=True).stdout
    assert "modules.dep" in mods


def test_a_root_that_does_not_fit_says_how_many_mib(tmp_path):
    from builder.payload.rootfs.stage import run
    tar = make_tar(tmp_path / "big.tar", [("./", "dir", {}), ("./sbin", "dir", {}),
                                         ("./sbin/init", "file", {"data": b"#!"}),
                                         ("./big", "file", {"data": bytes(40 * MIB)})])
    plan = {"source": {"kind": "tar", "path": str(tar)}, "staging": str(tmp_path / "s"),
            "work": str(tmp_path), "timestamp": TS,
            "hygiene": {"hostname": "vm", "files": []}, "modules": None,
            "ext4": {"target": str(tmp_path / "root.ext4"), "offset": 0, "size": 32 * MIB,
                     "uuid": str(uuid.UUID(int=3)), "hash_seed": str(uuid.UUID(int=4))}}
    with pytest.raises(ArmvmError) as err:
        run(plan)
    assert "does not fit its 32 MiB partition: it needs about" in str(err.value)
    assert not (tmp_path / "root.ext4").exists()


# --- the root's file system driver in the initramfs -----------------------------------------

def test_ext4_module_brings_its_crc32c_softdep(tmp_path):
    """armhf: ext4 is a module and needs crc32c through a softdep (not in depends=)."""
    from tests.kofixtures import make_kernel_tree
    from builder import spec
    from builder.payload.kernel import inspect_kernel, resolve_drivers
    from builder.payload.rootfs import root_fstype_modules
    mods = {
        "kernel/fs/ext4/ext4": [("name", "ext4"), ("depends", "mbcache,jbd2"), ("softdep", "pre: crc32c"),
                                ("alias", "fs-ext4")],
        "kernel/fs/mbcache": [("name", "mbcache"), ("depends", "")],
        "kernel/fs/jbd2/jbd2": [("name", "jbd2"), ("depends", "")],
        "kernel/crypto/crc32c_generic": [("name", "crc32c_generic"), ("depends", ""), ("alias", "crc32c"),
                                         ("alias", "crypto-crc32c")],
        "kernel/arch/arm/crypto/crc32_arm_ce": [("name", "crc32_arm_ce"), ("depends", ""),
                                                ("alias", "crc32c")],
    }
    tree = make_kernel_tree(tmp_path / "k", arch="armv7", version="6.12.0-test-armmp-lpae", modules=mods,
                            config={"CONFIG_MODULES": "y"})
    kinfo = inspect_kernel(tree, spec.ARCHES["armv7"])
    assert root_fstype_modules(kinfo, "ext4") == ["crc32c_generic", "ext4"]
    names = [m.name for m in resolve_drivers(kinfo, root_fstype_modules(kinfo, "ext4"))]
    assert set(names) == {"crc32c_generic", "ext4", "jbd2", "mbcache"}
    assert names.index("jbd2") < names.index("ext4")


@pytest.mark.skipif(os.geteuid() != 0, reason="makes device nodes and foreign owners in the source folder")
def test_root_from_a_folder_keeps_its_ownership(tmp_path):
    from builder.payload.rootfs.stage import run
    src = tmp_path / "src"
    for d in ("etc", "usr/sbin", "usr/bin", "dev", "srv/data"):
        (src / d).mkdir(parents=True)
    os.symlink("usr/sbin", src / "sbin")
    (src / "usr/sbin/init").write_bytes(b"#!/bin/sh\n")
    (src / "usr/bin/ping").write_bytes(b"\x7fELF")
    os.chmod(src / "usr/bin/ping", 0o4755)
    os.link(src / "usr/bin/ping", src / "usr/bin/ping6")
    os.mknod(src / "dev/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    (src / "srv/data/f").write_text("data")
    os.chown(src / "srv/data", 123, 456)
    os.chown(src / "srv/data/f", 123, 456)
    plan = {"source": {"kind": "dir", "path": str(src)}, "staging": str(tmp_path / "s"), "work": str(tmp_path),
            "timestamp": TS, "hygiene": {"hostname": "vm", "files": []}, "modules": None,
            "ext4": {"target": str(tmp_path / "root.ext4"), "offset": 0, "size": 32 * MIB,
                     "uuid": str(uuid.UUID(int=3)), "hash_seed": str(uuid.UUID(int=4))}}
    run(plan)
    img = str(tmp_path / "root.ext4")
    assert subprocess.run(["e2fsck", "-fn", img], capture_output=True).returncode == 0

    def st(path):
        return subprocess.run(["debugfs", "-R", f"stat {path}", img], capture_output=True, text=True).stdout
    assert "User:   123   Group:   456" in st("/srv/data/f")
    ping = st("/usr/bin/ping")
    assert "Mode:  04755" in ping and "Links: 2" in ping
    assert "character special" in st("/dev/zero")
    assert (src / "etc").is_dir() and not (src / "etc/hostname").exists()     # the source is untouched


def test_a_root_whose_etc_links_to_itself_is_a_clear_error(tmp_path):
    from builder.payload.rootfs.stage import run
    tar = make_tar(tmp_path / "loop.tar", [("./", "dir", {}), ("./etc", "sym", {"to": "/etc"}),
                                          ("./sbin", "dir", {}), ("./sbin/init", "file", {})])
    plan = {"source": {"kind": "tar", "path": str(tar)}, "staging": str(tmp_path / "s"), "work": str(tmp_path),
            "timestamp": TS, "hygiene": {"hostname": "vm", "files": []}, "modules": None,
            "ext4": {"target": str(tmp_path / "root.ext4"), "offset": 0, "size": 32 * MIB,
                     "uuid": str(uuid.UUID(int=3)), "hash_seed": str(uuid.UUID(int=4))}}
    with pytest.raises(ArmvmError, match="too many symlinks"):
        run(plan)
    assert not (tmp_path / "root.ext4").exists()
