from __future__ import annotations

import io
import os

import pytest
from elftools.elf.elffile import ELFFile

from builder.payload import kernel as kmod
from builder import spec
from builder.errors import ArmvmError
from builder.payload.kernel import builtin_names, elf_section, inspect_kernel, resolve_drivers
from tests.kofixtures import (compile_modinfo_object, kernel_image, make_kernel_tree, make_ko,
                              with_machine)

A64, A32 = spec.ARCHES["aarch64"], spec.ARCHES["armv7"]
VERSION = "6.12.0-test-arm64"


@pytest.fixture
def tree(tmp_path):
    return make_kernel_tree(tmp_path / "pkg", version=VERSION)


def names(mods):
    return [m.name for m in mods]


def test_inspect_trixie_layout(tree):
    k = inspect_kernel(tree, A64)
    assert k.version == VERSION
    assert k.image == tree / "boot" / f"vmlinuz-{VERSION}"
    assert (k.image_format, k.efi_stub, k.pe_machine) == ("arm64-image", True, 0xAA64)
    assert k.modules_dir == tree / "usr/lib/modules" / VERSION
    assert k.config_path == tree / "boot" / f"config-{VERSION}"
    assert k.config["CONFIG_VIRTIO_PCI"] == "y" and k.config["CONFIG_VIRTIO_NET"] == "m"
    assert k.config["CONFIG_LOCALVERSION"] == '"-test"' and "CONFIG_XEN" not in k.config
    assert sorted(k.modules) == ["failover", "net_failover", "virtio_blk", "virtio_mmio",
                                 "virtio_net", "xen_blkfront"]
    net = k.modules["virtio_net"]
    assert net.path == "kernel/drivers/net/virtio_net.ko.xz"
    assert net.depends == ("net_failover",) and net.aliases == ("virtio:d00000001v*",)
    assert k.modules["failover"].depends == ()
    xen = k.modules["xen_blkfront"]          # file name with '-', module name with '_'
    assert xen.path == "kernel/drivers/block/xen-blkfront.ko.xz"
    assert xen.aliases == ("xen:vbd", "xenblk")
    # modules.builtin entries plus '<name>.file=' records of modules.builtin.modinfo only
    assert builtin_names(k) == {"virtio", "virtio_pci", "amba_pl011", "crc32c_generic"}


def test_closure_and_load_order(tree):
    k = inspect_kernel(tree, A64)
    assert names(resolve_drivers(k, ["virtio_net"])) == ["failover", "net_failover", "virtio_net"]
    order = resolve_drivers(k, ["xen-blkfront", "virtio-net", "virtio_blk", "virtio_pci",
                                "VIRTIO", "failover"])
    # deps first; ties broken by name; built-ins (modules.builtin, config =y) skipped
    assert names(order) == ["failover", "net_failover", "virtio_blk", "virtio_net", "xen_blkfront"]
    assert order[0].path == "kernel/net/core/failover.ko.xz"
    assert resolve_drivers(k, ["virtio", "amba-pl011", "CONFIG_SERIAL_AMBA_PL011"]) == []
    # an exact alias finds its module; a built-in's alias counts as built in only by name
    assert names(resolve_drivers(k, ["xenblk"])) == ["xen_blkfront"]
    assert resolve_drivers(k, []) == []


def test_unknown_driver_suggests_close_matches(tree):
    k = inspect_kernel(tree, A64)
    with pytest.raises(ArmvmError) as err:
        resolve_drivers(k, ["virtio_nte"])
    msg = str(err.value)
    assert "'virtio_nte'" in msg and "'virtio_net'" in msg
    with pytest.raises(ArmvmError, match="virtio_pci"):
        resolve_drivers(k, ["virtio_pcu"])            # suggestions include built-ins
    with pytest.raises(ArmvmError, match="is a module; name the module"):
        resolve_drivers(k, ["VIRTIO_NET"])
    with pytest.raises(ArmvmError, match="CONFIG_XEN is not set"):
        resolve_drivers(k, ["CONFIG_XEN"])


def test_dependency_cycle_and_missing_dependency(tmp_path):
    mods = {"kernel/a/cyc_a": [("depends", "cyc_b")], "kernel/a/cyc_b": [("depends", "cyc_a")],
            "kernel/a/user": [("depends", "cyc_a")], "kernel/a/lonely": [("depends", "ghost")]}
    k = inspect_kernel(make_kernel_tree(tmp_path, modules=mods), A64)
    with pytest.raises(ArmvmError, match="cycle among: cyc_a, cyc_b, user"):
        resolve_drivers(k, ["user"])
    with pytest.raises(ArmvmError, match="'lonely' depends on 'ghost'"):
        resolve_drivers(k, ["lonely"])


def test_bookworm_layout_plain_ko(tmp_path):
    tree = make_kernel_tree(tmp_path, version="6.1.0-50-cloud-arm64", layout="bookworm",
                            compress=None)
    k = inspect_kernel(tree, A64)
    assert k.modules_dir == tree / "lib/modules/6.1.0-50-cloud-arm64"
    assert k.modules["virtio_net"].path == "kernel/drivers/net/virtio_net.ko"
    assert names(resolve_drivers(k, ["virtio_net"])) == ["failover", "net_failover", "virtio_net"]


@pytest.mark.parametrize("compress", ["gz", "zst", "xz", None])
def test_every_module_compression(tmp_path, compress):
    k = inspect_kernel(make_kernel_tree(tmp_path, compress=compress), A64)
    assert k.modules["net_failover"].depends == ("failover",)
    assert k.modules["net_failover"].path.endswith(".ko" + (f".{compress}" if compress else ""))


def test_armv7_zimage(tmp_path):
    tree = make_kernel_tree(tmp_path, version="6.12.0-test-armmp-lpae", arch="armv7")
    k = inspect_kernel(tree, A32)
    assert (k.image_format, k.pe_machine) == ("zimage", spec.PE_MACHINE_ARM)
    assert names(resolve_drivers(k, ["virtio_net"])) == ["failover", "net_failover", "virtio_net"]


def test_no_efi_stub_rejected(tmp_path):
    tree = make_kernel_tree(tmp_path, efi_stub=False)
    with pytest.raises(ArmvmError, match="kernel has no EFI stub"):
        inspect_kernel(tree, A64)


def test_wrong_arch_rejected(tmp_path):
    with pytest.raises(ArmvmError, match="wrong architecture"):
        inspect_kernel(make_kernel_tree(tmp_path / "a", arch="aarch64"), A32)
    with pytest.raises(ArmvmError, match="wrong architecture"):
        inspect_kernel(make_kernel_tree(tmp_path / "b", arch="armv7"), A64)
    # an arm64 Image whose PE header says ARMNT: a stub, but not one UEFI on ARM64 loads
    with pytest.raises(ArmvmError, match="no EFI stub for aarch64.*ARMNT"):
        inspect_kernel(make_kernel_tree(tmp_path / "c", pe_machine=spec.PE_MACHINE_ARMNT), A64)


def test_module_of_other_arch_rejected(tmp_path):
    tree = make_kernel_tree(tmp_path)
    make_ko(tree / "usr/lib/modules" / VERSION / "kernel/x/armmod", [("depends", "")],
            arch="armv7", compress="xz")
    with pytest.raises(ArmvmError, match=r"armmod\.ko\.xz: ELF machine 40, expected 183"):
        inspect_kernel(tree, A64)


def test_missing_pieces(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArmvmError, match="no kernel image in"):
        inspect_kernel(tmp_path / "empty", A64)
    with pytest.raises(ArmvmError, match="not a directory"):
        inspect_kernel(tmp_path / "nowhere", A64)
    tree = make_kernel_tree(tmp_path / "t")
    (tree / "boot" / "vmlinuz-7.0.0-other").write_bytes(kernel_image())
    with pytest.raises(ArmvmError, match="several kernels.*6.12.0-test-arm64, 7.0.0-other"):
        inspect_kernel(tree, A64)


def test_corrupt_modules_give_errors_not_tracebacks(tmp_path):
    tree = make_kernel_tree(tmp_path)
    mdir = tree / "usr/lib/modules" / VERSION
    (mdir / "kernel/bad.ko.xz").write_bytes(b"not xz at all")
    with pytest.raises(ArmvmError, match=r"bad\.ko\.xz: cannot decompress"):
        inspect_kernel(tree, A64)
    (mdir / "kernel/bad.ko.xz").unlink()
    good = (mdir / "kernel/drivers/net/virtio_net.ko.xz")
    import lzma
    raw = lzma.decompress(good.read_bytes())
    (mdir / "kernel/trunc.ko").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArmvmError, match=r"trunc\.ko: section header table out of range"):
        inspect_kernel(tree, A64)


@pytest.mark.parametrize("elf32", [False, True])
def test_modinfo_reader_agrees_with_pyelftools(elf32):
    fields = [("depends", "a,b"), ("alias", "virtio:d00000001v*"), ("name", "x")]
    obj = with_machine(compile_modinfo_object(fields, elf32=elf32), 183)
    machine, raw = elf_section(obj, ".modinfo", "test")
    expected = ELFFile(io.BytesIO(obj)).get_section_by_name(".modinfo").data()
    assert machine == 183 and raw == expected
    assert kmod.parse_modinfo(raw) == fields


def test_index_cache_is_used_and_invalidated(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cold = inspect_kernel(tree, A64, index_cache=cache)
    assert len(list(cache.iterdir())) == 1

    def no_scan(*args):
        raise AssertionError("module rescanned although the index cache is warm")

    monkeypatch.setattr(kmod, "_scan_one", no_scan)
    warm = inspect_kernel(tree, A64, index_cache=cache)
    assert warm.modules == cold.modules
    # a changed module file (size differs) invalidates the index
    target = tree / "usr/lib/modules" / VERSION / "kernel/net/core/failover.ko.xz"
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(AssertionError, match="rescanned"):
        inspect_kernel(tree, A64, index_cache=cache)
    # a corrupt cache file is ignored, not trusted
    monkeypatch.undo()
    target.write_bytes(target.read_bytes()[:-1])
    next(cache.iterdir()).write_text("{not json")
    assert inspect_kernel(tree, A64, index_cache=cache).modules == cold.modules


def test_symlinked_module_files_are_not_followed(tree, tmp_path):
    outside = make_ko(tmp_path / "outside" / "evil", [("name", "evil"), ("depends", "")],
                      compress=None)
    os.symlink(outside, tree / "usr/lib/modules" / VERSION / "kernel/evil.ko")
    assert "evil" not in inspect_kernel(tree, A64).modules
